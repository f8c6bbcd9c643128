/*
 * kvm-probe.S: a 238-byte multiboot kernel that tells whether KVM can really
 * run a guest here.  vhostnet/launch/qemu.py embeds the assembled bytes (see
 * KVM_PROBE there; tests/test_qemu_smoke.py checks they match this source).
 *
 * Some hosts expose a /dev/kvm on which QEMU starts fine but every fresh
 * guest page costs a slow exit: a Linux kernel then needs minutes to clear
 * its .bss.  So "QEMU starts with -accel kvm" proves nothing; this probe does
 * what a booting kernel does first: enter long mode with paging, then write
 * 64 MiB of fresh memory.  Real KVM finishes in well under a second (TCG in
 * ~0.3 s); the broken kind takes ~20 s and misses the caller's deadline.
 *
 * It prints "kvm-probe: ok" on COM1 and exits QEMU through isa-debug-exit
 * (-device isa-debug-exit,iobase=0xf4,iosize=4): writing 0x10 there makes
 * QEMU exit with status (0x10 << 1) | 1 = 33.
 *
 * Build: gcc -c kvm-probe.S -o p.o && objcopy -O binary p.o kvm-probe.bin
 */
    .code32
    .text
    .globl _start
base = 0x100000             /* the multiboot loader puts us at 1 MiB */
_start:
hdr:                        /* multiboot v1 header, a.out kludge (flag 16) */
    .long 0x1BADB002
    .long 0x00010000
    .long -(0x1BADB002 + 0x00010000)
    .long base + (hdr - _start)     /* header_addr */
    .long base                      /* load_addr */
    .long 0                         /* load_end_addr: the whole file */
    .long 0                         /* bss_end_addr: none */
    .long base + (entry - _start)   /* entry_addr */
entry:                      /* 32-bit protected mode, paging off */
    mov $0x10000, %edi      /* page tables: PML4 0x10000, PDPT 0x11000, PD 0x12000 */
    xor %eax, %eax
    mov $(3*4096/4), %ecx
    rep stosl
    movl $0x11003, 0x10000
    movl $0x12003, 0x11000
    mov $0x12000, %edi      /* identity-map 1 GiB with 2 MiB pages */
    mov $0x83, %eax
    mov $512, %ecx
1:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 1b
    mov %cr4, %eax          /* PAE */
    or $0x20, %eax
    mov %eax, %cr4
    mov $0x10000, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx   /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax          /* PG + PE */
    or $0x80000001, %eax
    mov %eax, %cr0
    lgdt base + (gdtr - _start)
    ljmp $0x08, $(base + (long64 - _start))
    .code64
long64:
    mov $0x400000, %rdi     /* touch 64 MiB from 4 MiB up */
    mov $(64 << 20), %rcx
    mov $0x5a, %al
    rep stosb
    lea msg(%rip), %rsi
    mov $0x3f8, %dx         /* COM1 */
2:  lodsb
    test %al, %al
    jz 3f
    out %al, %dx
    jmp 2b
3:  mov $0xf4, %dx          /* isa-debug-exit */
    mov $0x10, %al
    out %al, %dx
4:  hlt
    jmp 4b
msg:
    .asciz "kvm-probe: ok\n"
    .align 8
gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 64-bit code segment */
gdtr:
    .word gdtr - gdt - 1
    .long base + (gdt - _start)
