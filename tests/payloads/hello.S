// Prints a greeting on the 16550 UART at 0x1000_0000, then PSCI SYSTEM_OFF.
    .text
    .global _start
_start:
    movz    x1, #0x1000, lsl #16        // x1 = UART base (layout::SERIAL_START)
    adr     x2, msg
1:  ldrb    w3, [x2], #1
    cbz     w3, 2f
    strb    w3, [x1]                    // THR
    b       1b
2:  movz    x0, #0x8400, lsl #16
    movk    x0, #0x0008                 // PSCI_0_2_FN_SYSTEM_OFF
    hvc     #0
3:  b       3b                          // not reached
msg:
    .asciz  "Hello from dormouse!\n"
    .balign 4
