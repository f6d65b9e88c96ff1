"""Shared by the memory tests: how much allocator slack a bounded-memory check allows.

glibc's allocator may keep memory beyond the live buffers (per-thread arenas, a heap that
fragments as chunked codecs free and reallocate): measured 0-30 MiB here, varying with the
machine's load. The tests' models are 128 MiB, so a whole-model copy stays far above it.
"""

MALLOC_SLACK = 32 << 20
