// The hot per-element loops are compiled twice, for baseline x86-64 (SSE2) and for AVX2, and the better one
// is chosen once when the module loads (GCC/Clang function multiversioning: an ifunc). `flatten` inlines the
// loop's helpers into each clone, so the whole loop is built for its target. The two clones give
// bit-identical results: the same IEEE-754 operations in the same order, and no fused multiply-add (FMA is
// not part of the AVX2 target). Elsewhere (other CPUs, sanitizer builds) there is one baseline version.
#pragma once

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(memory_sanitizer) || __has_feature(thread_sanitizer)
#define QDQFOLD_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define QDQFOLD_SANITIZED 1
#endif

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(QDQFOLD_SANITIZED) && \
    !defined(QDQFOLD_NO_CLONES)
#define QDQFOLD_VECTOR_CLONES __attribute__((target_clones("avx2", "default"), flatten))
#else
#define QDQFOLD_VECTOR_CLONES
#endif
