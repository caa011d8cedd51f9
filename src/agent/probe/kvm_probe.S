/* The KVM probe firmware: the steps a Linux boot takes before its first console line.
 * It starts in real mode at the reset vector, switches to 32-bit protected mode, builds
 * identity page tables and enters 64-bit long mode with paging on, writing a marker to
 * the first serial port (COM1, 0x3f8) after each step: 'R' real mode, 'P' protected mode, 'L' long
 * mode. The agent runs it as a libvirt domain whose serial console is a file, and reads
 * how far it got (QEMU's 16550 takes a byte at its data register without set-up). Rebuild: see tests in src/agent/accel.rs.
 * Linked at 0xf0000: QEMU maps a 64 KiB BIOS image there (and below 4 GiB). */
	.text
	.code16
	.globl _start
_start:
	cli
	mov	$0x3f8, %dx
	mov	$'R', %al
	out	%al, (%dx)
	lgdtl	%cs:(gdt_desc - _start)
	mov	%cr0, %eax
	or	$1, %eax
	mov	%eax, %cr0
	ljmpl	$0x08, $pm32

	.code32
pm32:
	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	$0x9000, %esp
	mov	$0x3f8, %dx
	mov	$'P', %al
	out	%al, (%dx)
	/* PML4 at 0x1000 -> PDPT at 0x2000 -> PD at 0x3000: one 2 MiB page at 0. */
	mov	$0x1000, %edi
	xor	%eax, %eax
	mov	$(3 * 4096 / 4), %ecx
	cld
	rep stosl
	movl	$0x2003, 0x1000
	movl	$0x3003, 0x2000
	movl	$0x83, 0x3000
	mov	%cr4, %eax
	or	$0x20, %eax		/* PAE */
	mov	%eax, %cr4
	mov	$0x1000, %eax
	mov	%eax, %cr3
	mov	$0xc0000080, %ecx	/* EFER */
	rdmsr
	or	$0x100, %eax		/* LME */
	wrmsr
	mov	%cr0, %eax
	or	$0x80000000, %eax	/* PG */
	mov	%eax, %cr0
	ljmp	$0x18, $lm64

	.code64
lm64:
	mov	$0x3f8, %dx
	mov	$'L', %al
	out	%al, (%dx)
1:	hlt
	jmp	1b

	.align 8
gdt:
	.quad	0
	.quad	0x00cf9a000000ffff	/* 0x08: 32-bit code */
	.quad	0x00cf92000000ffff	/* 0x10: data */
	.quad	0x00af9a000000ffff	/* 0x18: 64-bit code */
gdt_desc:
	.word	gdt_desc - gdt - 1
	.long	gdt

	/* The reset vector: the CPU starts at 0xfffffff0, the image's last 16 bytes. */
	.org	0xfff0
	.code16
	ljmp	$0xf000, $0		/* _start */
	.org	0x10000
