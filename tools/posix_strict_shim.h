// Force-included (-include) by tools/check_portable.sh in its strict-POSIX compile of the core
// (-U_GNU_SOURCE -D_POSIX_C_SOURCE=200809L). It is for libstdc++, not for qdqfold: GCC's <mutex> and
// <condition_variable> (used by cpp/core/background_writer.h) call two glibc functions that glibc declares
// only under _GNU_SOURCE, which is why g++ always defines it. They are declared here, as glibc does; nothing
// of qdqfold's own code depends on them (cpp/platform/posix.cpp compiles without this file).
#pragma once

#if defined(__cplusplus)
#include <pthread.h>
#include <time.h>
#if defined(__GLIBC__) && !defined(__USE_GNU)
extern "C" {
int pthread_cond_clockwait(pthread_cond_t* cond, pthread_mutex_t* mutex, clockid_t clock, const struct timespec* abstime);
int pthread_mutex_clocklock(pthread_mutex_t* mutex, clockid_t clock, const struct timespec* abstime);
}
#endif
#endif
