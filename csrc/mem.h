/* Hints to the kernel about the compiled core's large buffers. */
#ifndef ICAFAST_MEM_H
#define ICAFAST_MEM_H

#include <stddef.h>
#include <stdint.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

/* Storage at least this large asks for transparent huge pages (the size of one on x86-64). */
#define ICAFAST_HUGE_PAGE_MIN ((size_t)2 << 20)

/* Ask for transparent huge pages over the pages of [p, p + n), before they are first touched.
 * Only a hint: where the kernel has none to give, or the platform has no madvise, nothing
 * changes. With the kernel's THP defrag setting at "madvise" (a common default), the first
 * touch may compact memory to find huge pages: a one-time cost when a ring grows past 2 MiB,
 * which an administrator can avoid with defrag "defer". */
static inline void icafast_hint_huge_pages(void *p, size_t n)
{
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (n >= ICAFAST_HUGE_PAGE_MIN) {
        uintptr_t start = (uintptr_t)p & ~(uintptr_t)4095;
        (void)madvise((void *)start, (uintptr_t)p + n - start, MADV_HUGEPAGE);
    }
#else
    (void)p;
    (void)n;
#endif
}

#endif
