// Two vCPUs. vCPU 0 starts vCPU 1 with PSCI CPU_ON and waits for it to set
// a flag; vCPU 1 prints its MPIDR affinity-0 digit, sets the flag and turns
// itself off with PSCI CPU_OFF; vCPU 0 then powers the VM off.
    .text
    .global _start
_start:
    movz    x1, #0x1000, lsl #16        // UART base
    adr     x2, msg_start
    bl      puts
    movz    x0, #0xc400, lsl #16
    movk    x0, #0x0003                 // PSCI_0_2_FN64_CPU_ON
    mov     x1, #1                      // target MPIDR: Aff0 = 1
    adr     x2, secondary               // entry point
    mov     x3, #0                      // context id
    hvc     #0
    movz    x1, #0x1000, lsl #16        // hvc may clobber x1..x3
    cbnz    x0, cpu_on_failed           // PSCI_RET_SUCCESS is 0
    adr     x5, flag
wait:
    ldr     w6, [x5]
    cbz     w6, wait
    adr     x2, msg_done
    bl      puts
poweroff:
    movz    x0, #0x8400, lsl #16
    movk    x0, #0x0008                 // SYSTEM_OFF
    hvc     #0
    b       poweroff
cpu_on_failed:
    adr     x2, msg_failed
    bl      puts
    b       poweroff

secondary:
    movz    x1, #0x1000, lsl #16
    adr     x2, msg_hello
    bl      puts
    mrs     x4, mpidr_el1
    and     x4, x4, #0xff
    add     w4, w4, #'0'
    strb    w4, [x1]
    mov     w4, #'\n'
    strb    w4, [x1]
    adr     x5, flag
    mov     w6, #1
    str     w6, [x5]
    movz    x0, #0x8400, lsl #16
    movk    x0, #0x0002                 // PSCI_0_2_FN_CPU_OFF
    hvc     #0
1:  b       1b

// puts: writes the NUL-terminated string at x2 to the UART at x1.
puts:
    ldrb    w3, [x2], #1
    cbz     w3, 1f
    strb    w3, [x1]
    b       puts
1:  ret

    .balign 4
flag:
    .word   0
msg_start:
    .asciz  "cpu0: starting cpu1\n"
msg_hello:
    .asciz  "cpu1: hello, mpidr aff0 = "
msg_done:
    .asciz  "cpu0: cpu1 done\n"
msg_failed:
    .asciz  "cpu0: CPU_ON failed\n"
    .balign 4
