// The golden snapshots' guest (tests/golden_runs.rs): counter.S that also
// prints. vCPU 0 starts vCPU 1 with PSCI CPU_ON (which just fails with one
// vCPU), then each keeps its count in x1 and stores it to its own word at
// 0x8010_0000 + 8 * Aff0. Every 2^16 counts vCPU 0 prints the count on the
// 16550 UART at 0x1000_0000 as "tick <16 hex digits>\n". A restore that
// lost the registers restarts the count (and the printed numbers) at zero.
    .text
    .global _start
_start:
    movz    x0, #0xc400, lsl #16
    movk    x0, #0x0003                 // PSCI_0_2_FN64_CPU_ON
    mov     x1, #1                      // target MPIDR: Aff0 = 1
    adr     x2, count                   // entry point
    mov     x3, #0
    hvc     #0
count:
    mrs     x4, mpidr_el1
    and     x4, x4, #0xff
    movz    x2, #0x8010, lsl #16
    add     x2, x2, x4, lsl #3          // x2 = this vCPU's word
    movz    x5, #0x1000, lsl #16        // x5 = UART base (layout::SERIAL_START)
    mov     x1, #0
1:  add     x1, x1, #1
    str     x1, [x2]
    cbnz    x4, 1b                      // only vCPU 0 prints
    tst     x1, #0xffff
    b.ne    1b
    adr     x6, prefix
2:  ldrb    w7, [x6], #1
    cbz     w7, 3f
    strb    w7, [x5]                    // THR
    b       2b
3:  mov     x8, #60                     // the top nibble's shift
4:  lsr     x7, x1, x8
    and     x7, x7, #0xf
    add     x9, x7, #'0'
    add     x10, x7, #('a' - 10)
    cmp     x7, #10
    csel    x7, x9, x10, lo
    strb    w7, [x5]
    subs    x8, x8, #4
    b.ge    4b
    mov     w7, #'\n'
    strb    w7, [x5]
    b       1b
prefix:
    .asciz  "tick "
    .balign 4
