// Touches pages on command, for resume-to-working-set benches. The control
// page at 0x8000_1000 holds:
//   [0]  op: 0 reads a word of each page, 1 writes the generation into it
//   [8]  first page (pages from DRAM_START; 0 and 1 are code and control)
//   [16] page count
//   [24] spacing: pages from one working-set page to the next
//   [32] multiplier of the visiting order: page k of the round is
//        first + ((k * mult) mod count) * spacing, a permutation when mult
//        and count are coprime; 1 visits them in order
//   [40] a generation the host bumps to ask for a round
//   [48] the generation last completed
//   [56] the sum of the words read in the last round
// Between rounds it spins on the generation word.
    .text
    .global _start
_start:
    movz    x5, #0x8000, lsl #16        // DRAM_START
    add     x7, x5, #0x1000             // control page
outer:
    ldr     x10, [x7, #40]              // generation asked
    ldr     x11, [x7, #48]              // generation done
    cmp     x10, x11
    b.eq    outer
    ldr     x0, [x7]                    // op
    ldr     x1, [x7, #8]                // first
    ldr     x2, [x7, #16]               // count
    ldr     x3, [x7, #24]               // spacing
    ldr     x4, [x7, #32]               // mult
    mov     x6, #0                      // k
    mov     x12, #0                     // sum
1:  cmp     x6, x2
    b.hs    3f
    mul     x13, x6, x4
    udiv    x14, x13, x2
    msub    x13, x14, x2, x13           // (k * mult) mod count
    madd    x13, x13, x3, x1            // page
    add     x13, x5, x13, lsl #12       // its address
    cbz     x0, 2f
    str     x10, [x13]
    b       4f
2:  ldr     x14, [x13]
    add     x12, x12, x14
4:  add     x6, x6, #1
    b       1b
3:  str     x12, [x7, #56]
    str     x10, [x7, #48]              // round done
    b       outer
