// Both vCPUs count forever. vCPU 0 starts vCPU 1 with PSCI CPU_ON (which
// just fails with one vCPU), then each keeps its count in x1 and stores it
// to its own word at 0x8010_0000 + 8 * Aff0. If a restore lost the
// registers, the stored count would restart from zero.
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
    mov     x1, #0
1:  add     x1, x1, #1
    str     x1, [x2]
    b       1b
