/*
 * sandbox-confine COMMAND [ARG...]: run COMMAND under a seccomp filter of its own, which it and
 * everything it starts keep (no-new-privileges is set first, as seccomp requires).
 *
 * The engine starts the terminal's tmux through it, so the candidate's shell and everything run
 * from it are refused what Docker's default profile refuses a container: new namespaces
 * (unshare, setns, clone with CLONE_NEW*), mounts, kernel keyrings, BPF, perf events,
 * userfaultfd, file handles, modules, kexec, swap, the clock, reboot, raw I/O ports, and
 * other architectures' system call tables. Under runc Docker's profile already does this and
 * the filter adds nothing; under runsc (gVisor) the version Debian 12 ships applies the
 * container's profile to the container's first process only, not to what `docker exec`
 * starts, which is how terminals start (docs/security.md, gVisor).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#define NR offsetof(struct seccomp_data, nr)
#define ARCH offsetof(struct seccomp_data, arch)
#define ARG0 offsetof(struct seccomp_data, args[0])
#define DENY(nr) BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 1), \
	BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM)
#define NEW_NAMESPACES (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | \
	CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET)

int main(int argc, char **argv) {
	if (argc < 2) {
		fprintf(stderr, "usage: sandbox-confine COMMAND [ARG...]\n");
		return 2;
	}
	struct sock_filter filter[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARCH),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, NR),
		/* The x32 table (numbers with bit 30 set) is another way into the same calls. */
		BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
		/* clone3 takes its flags in memory a filter cannot read: ENOSYS, and glibc falls
		 * back to clone, whose flags it can (as Docker's profile does). */
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone3, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone, 0, 4),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG0),
		BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, NEW_NAMESPACES, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		DENY(SYS_unshare), DENY(SYS_setns),
		DENY(SYS_mount), DENY(SYS_umount2), DENY(SYS_pivot_root), DENY(SYS_chroot),
		DENY(SYS_fsopen), DENY(SYS_fsconfig), DENY(SYS_fsmount), DENY(SYS_fspick),
		DENY(SYS_move_mount), DENY(SYS_open_tree), DENY(SYS_mount_setattr),
		DENY(SYS_keyctl), DENY(SYS_add_key), DENY(SYS_request_key),
		DENY(SYS_bpf), DENY(SYS_perf_event_open), DENY(SYS_userfaultfd),
		DENY(SYS_open_by_handle_at), DENY(SYS_name_to_handle_at),
		DENY(SYS_init_module), DENY(SYS_finit_module), DENY(SYS_delete_module),
		DENY(SYS_kexec_load), DENY(SYS_kexec_file_load),
		DENY(SYS_swapon), DENY(SYS_swapoff), DENY(SYS_reboot), DENY(SYS_acct),
		DENY(SYS_settimeofday), DENY(SYS_clock_settime), DENY(SYS_clock_adjtime),
		DENY(SYS_adjtimex), DENY(SYS_iopl), DENY(SYS_ioperm), DENY(SYS_quotactl),
		DENY(SYS_lookup_dcookie), DENY(SYS_fanotify_init), DENY(SYS_syslog),
		DENY(SYS_vhangup), DENY(SYS_uselib), DENY(SYS_ustat), DENY(SYS_sysfs),
		DENY(SYS__sysctl),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog program = {
		.len = (unsigned short)(sizeof(filter) / sizeof(filter[0])),
		.filter = filter,
	};
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
	    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) != 0) {
		fprintf(stderr, "sandbox-confine: cannot install the filter: %s\n", strerror(errno));
		return 126;
	}
	execvp(argv[1], argv + 1);
	fprintf(stderr, "sandbox-confine: %s: %s\n", argv[1], strerror(errno));
	return 127;
}
