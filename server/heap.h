// How the daemon's C library keeps freed memory.
#ifndef OPTD_SERVER_HEAP_H_
#define OPTD_SERVER_HEAP_H_

#include <cstdint>

#include "absl/status/status.h"

namespace optd::server {

// Up to `bytes` of freed memory per malloc arena stays in the process, and allocations below
// min(bytes, 32 MiB) come from the heap rather than pages mapped for them alone (glibc's
// M_TRIM_THRESHOLD and M_MMAP_THRESHOLD). A step allocates and frees its messages, chunks and
// results, hundreds of KiB each: with glibc's dynamic defaults the heap's top is trimmed after
// them and every step faults in freshly zeroed pages again. bytes = 0 leaves the defaults.
// INVALID_ARGUMENT when bytes is negative or over 2 GiB; UNIMPLEMENTED where it cannot be done
// (a C library other than glibc): the defaults then hold. Under a sanitizer, whose allocator
// keeps its own policy, it does nothing.
absl::Status KeepFreedHeap(int64_t bytes);

}  // namespace optd::server

#endif  // OPTD_SERVER_HEAP_H_
