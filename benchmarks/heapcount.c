/* An allocation counter to preload (LD_PRELOAD) into a process: the bytes malloc and its family
 * have handed out and not taken back, on every thread, and their high-water mark since the last
 * reset. It is what a GPU's allocator reports as allocated (torch.cuda.max_memory_allocated), for
 * the host: the resident set also holds the blocks glibc keeps after they are freed, which depends
 * on the order of allocations and on the threads' arenas more than on what lives.
 *
 * Every call goes to glibc's own entry points (__libc_malloc, ...), so nothing here allocates;
 * the sizes are malloc_usable_size's. core.memory.usage reads the counts when the library is
 * loaded (allocated_bytes, allocated_peak, reset_peak). Built by benchmarks/_heap.py. */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stddef.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void *__libc_valloc(size_t);
extern void *__libc_pvalloc(size_t);

static long long live_bytes, peak_bytes;

static void counted(void *p) {
    if (!p) return;
    long long size = (long long)malloc_usable_size(p);
    long long now = __atomic_add_fetch(&live_bytes, size, __ATOMIC_RELAXED);
    long long seen = __atomic_load_n(&peak_bytes, __ATOMIC_RELAXED);
    while (now > seen
           && !__atomic_compare_exchange_n(&peak_bytes, &seen, now, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}
static void uncounted(void *p) {
    if (p) __atomic_sub_fetch(&live_bytes, (long long)malloc_usable_size(p), __ATOMIC_RELAXED);
}

void *malloc(size_t n) { void *p = __libc_malloc(n); counted(p); return p; }
void free(void *p) { uncounted(p); __libc_free(p); }
void *calloc(size_t a, size_t b) { void *p = __libc_calloc(a, b); counted(p); return p; }
void *realloc(void *q, size_t n) {
    uncounted(q);
    void *p = __libc_realloc(q, n);
    if (p) counted(p); else if (q && n) counted(q);
    return p;
}
void *reallocarray(void *q, size_t n, size_t size) {      /* glibc's own would not come back here */
    if (size && n > (size_t)-1 / size) { errno = ENOMEM; return NULL; }
    return realloc(q, n * size);
}
void *memalign(size_t a, size_t n) { void *p = __libc_memalign(a, n); counted(p); return p; }
void *aligned_alloc(size_t a, size_t n) { return memalign(a, n); }
void *valloc(size_t n) { void *p = __libc_valloc(n); counted(p); return p; }
void *pvalloc(size_t n) { void *p = __libc_pvalloc(n); counted(p); return p; }
int posix_memalign(void **out, size_t a, size_t n) {
    void *p = __libc_memalign(a, n);
    if (!p && n) return ENOMEM;
    counted(p); *out = p; return 0;
}

long long loom_heap_live(void) { return __atomic_load_n(&live_bytes, __ATOMIC_RELAXED); }
long long loom_heap_peak(void) { return __atomic_load_n(&peak_bytes, __ATOMIC_RELAXED); }
void loom_heap_reset_peak(void) {
    __atomic_store_n(&peak_bytes, __atomic_load_n(&live_bytes, __ATOMIC_RELAXED), __ATOMIC_RELAXED);
}
