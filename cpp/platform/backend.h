// Which backend of cpp/core/file_io.h this build compiles (every file in cpp/platform/ is built; each one
// compiles to nothing unless it is the chosen one):
//   QDQFOLD_IO_WINDOWS  windows.cpp   Win32 calls (MinGW-w64 and MSVC).
//   QDQFOLD_IO_LINUX    posix.cpp     POSIX plus copy_file_range, mkstemps, madvise, MAP_ANONYMOUS.
//   QDQFOLD_IO_POSIX    posix.cpp     POSIX.1-2008 only: macOS, the BSDs, musl or not, and Linux itself when
//                                     built with -DQDQFOLD_PORTABLE_IO=ON (CMake), which is how CI tests it.
#pragma once

#if defined(_WIN32)
#define QDQFOLD_IO_WINDOWS 1
#elif defined(__linux__) && !defined(QDQFOLD_PORTABLE_IO)
#define QDQFOLD_IO_LINUX 1
#else
#define QDQFOLD_IO_POSIX 1
#endif
