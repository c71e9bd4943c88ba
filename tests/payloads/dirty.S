// Dirties pages on command, for diff-snapshot benches. The control page at
// 0x8000_1000 holds: [0] how many pages to write, [8] a generation number
// the host bumps to ask for a round, [16] the generation last completed.
// Each round writes the generation into the first word of pages 2..2+n
// (from 0x8000_2000), reports it done, and spins until the next round.
    .text
    .global _start
_start:
    movz    x5, #0x8000, lsl #16        // DRAM_START
    add     x7, x5, #0x1000             // control page
    add     x8, x5, #0x2000             // first page to dirty
outer:
    ldr     x1, [x7]                    // pages this round
    ldr     x2, [x7, #8]                // generation
    mov     x3, x8
    mov     x4, #0
1:  cmp     x4, x1
    b.ge    2f
    str     x2, [x3]
    add     x3, x3, #0x1000
    add     x4, x4, #1
    b       1b
2:  str     x2, [x7, #16]               // round done
3:  ldr     x9, [x7, #8]
    cmp     x9, x2
    b.eq    3b                          // wait for the next generation
    b       outer
