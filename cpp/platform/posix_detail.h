// What posix.cpp and posix_output.cpp (the POSIX backend of cpp/core/file_io.h) share. No operating system
// header.
#pragma once

namespace qdqfold::io::detail {

// close(fd), keeping errno as it was (for a caller that reports the error before the close).
void close_keeping_errno(int fd);
// The system's page size, read when the SIGBUS guard is installed (the first MappedFile); 4096 before.
long page_size();

}  // namespace qdqfold::io::detail
