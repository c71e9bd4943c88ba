// Prints "rebooting" on the UART, then PSCI SYSTEM_RESET.
    .text
    .global _start
_start:
    movz    x1, #0x1000, lsl #16        // UART base
    adr     x2, msg
1:  ldrb    w3, [x2], #1
    cbz     w3, 2f
    strb    w3, [x1]
    b       1b
2:  movz    x0, #0x8400, lsl #16
    movk    x0, #0x0009                 // PSCI_0_2_FN_SYSTEM_RESET
    hvc     #0
3:  b       3b
msg:
    .asciz  "rebooting\n"
    .balign 4
