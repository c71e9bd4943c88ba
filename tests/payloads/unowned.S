// Writes to and reads back from two addresses no device owns (a free MMIO
// slot, and the first byte past a 128 MiB RAM), prints whether both reads
// gave zero, then powers off.
    .text
    .global _start
_start:
    movz    x1, #0x1000, lsl #16        // UART base
    movz    x5, #0x3000, lsl #16        // 0x3000_0000: free MMIO space
    movz    x6, #0x8800, lsl #16        // 0x8800_0000: RAM end (128 MiB at 0x8000_0000)
    movz    x7, #0xbeef
    movk    x7, #0xdead, lsl #16
    str     x7, [x5]
    str     x7, [x6]
    ldr     x8, [x5]
    ldr     x9, [x6]
    orr     x8, x8, x9
    adr     x2, msg_zero
    cbz     x8, 1f
    adr     x2, msg_nonzero
1:  ldrb    w3, [x2], #1
    cbz     w3, 2f
    strb    w3, [x1]
    b       1b
2:  movz    x0, #0x8400, lsl #16
    movk    x0, #0x0008                 // SYSTEM_OFF
    hvc     #0
3:  b       3b
msg_zero:
    .asciz  "unowned reads gave zero\n"
msg_nonzero:
    .asciz  "unowned reads gave data\n"
    .balign 4
