/* A preloaded library that hides AVX-512, VNNI and AMX from the process's CPUID, so that ONNX Runtime
 * (and anything else that dispatches on CPUID) picks the kernels of a plain AVX2 host.
 *
 *     gcc -O2 -shared -fPIC -o cpuid_mask.so cpuid_mask.c
 *     LD_PRELOAD=./cpuid_mask.so python ...
 *
 * Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, /proc/cpuinfo flag "cpuid_fault") makes every
 * CPUID instruction raise SIGSEGV; the handler runs the real instruction with faulting briefly off,
 * clears the hidden feature bits and steps over the instruction. The setting is per thread and
 * inherited by threads created later, so it is set in a constructor, before ONNX Runtime is loaded.
 * Code that ran CPUID earlier (the dynamic loader's own dispatch of libc routines) keeps the real
 * answer; that moves nothing that a benchmark of model kernels measures. benchmarks/isa.py builds it.
 *
 * A SIGSEGV handler installed later (Python's faulthandler, PYTHONFAULTHANDLER=1) would take the
 * faults and kill the process at the next CPUID, so this library also provides sigaction() and
 * signal(): for SIGSEGV they record the new handler as the one real faults are handed to, and leave
 * this one installed.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_GET_CPUID 0x1011
#define ARCH_SET_CPUID 0x1012

static struct sigaction previous;
static int installed;
typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static int real_sigaction(int signum, const struct sigaction *action, struct sigaction *old) {
    static sigaction_fn next;
    if (!next) next = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return next(signum, action, old);
}

/* Later handlers for SIGSEGV are chained behind the CPUID emulation instead of replacing it. */
int sigaction(int signum, const struct sigaction *action, struct sigaction *old) {
    if (signum != SIGSEGV || !installed) return real_sigaction(signum, action, old);
    if (old) *old = previous;
    if (action) previous = *action;
    return 0;
}

sighandler_t signal(int signum, sighandler_t handler) {
    struct sigaction action, old;
    memset(&action, 0, sizeof action);
    action.sa_handler = handler;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    if (sigaction(signum, &action, &old) != 0) return SIG_ERR;
    return old.sa_handler;
}

static void emulate(uint32_t leaf, uint32_t subleaf, uint32_t r[4]) {
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, subleaf, r[0], r[1], r[2], r[3]);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    if (leaf == 7 && subleaf == 0) {
        /* EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
        r[1] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) |
                  (1u << 30) | (1u << 31));
        /* ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
        r[2] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, FP16 23, AMX-TILE 24, AMX-INT8 25 */
        r[3] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && subleaf == 1) {
        /* EAX: AVX-VNNI 4, AVX512_BF16 5, AMX-FP16 21, AVX-IFMA 23;
         * EDX: AVX-VNNI-INT8 4, AVX-NE-CONVERT 5, AMX-COMPLEX 8, AVX-VNNI-INT16 10, AVX10 19 */
        r[0] &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        r[3] &= ~((1u << 4) | (1u << 5) | (1u << 8) | (1u << 10) | (1u << 19));
    } else if (leaf == 0x24) {
        r[0] = r[1] = r[2] = r[3] = 0; /* AVX10's own leaf */
    }
}

static void on_segv(int signal, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    /* A faulting CPUID is a general-protection fault, which the kernel reports as SI_KERNEL; only
     * then is the instruction pointer known to point at readable code. */
    unsigned char *ip = (unsigned char *)uc->uc_mcontext.gregs[REG_RIP];
    if (info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {
        uint32_t r[4];
        emulate((uint32_t)uc->uc_mcontext.gregs[REG_RAX], (uint32_t)uc->uc_mcontext.gregs[REG_RCX], r);
        uc->uc_mcontext.gregs[REG_RAX] = r[0];
        uc->uc_mcontext.gregs[REG_RBX] = r[1];
        uc->uc_mcontext.gregs[REG_RCX] = r[2];
        uc->uc_mcontext.gregs[REG_RDX] = r[3];
        uc->uc_mcontext.gregs[REG_RIP] += 2;
        return;
    }
    /* A real fault: hand it to whoever had the signal before (or die of it). */
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(signal, info, context);
    } else if (previous.sa_handler != SIG_IGN && previous.sa_handler != SIG_DFL) {
        previous.sa_handler(signal);
    } else if (previous.sa_handler != SIG_IGN) {
        struct sigaction fallback;
        memset(&fallback, 0, sizeof fallback);
        fallback.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &fallback, NULL);
        /* A real fault recurs on return and now kills; a sent signal does not recur, so resend it. */
        if (info->si_code <= 0) raise(signal);
    }
}

__attribute__((constructor)) static void start(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    if (real_sigaction(SIGSEGV, &action, &previous) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        fprintf(stderr, "cpuid_mask: this kernel or CPU has no CPUID faulting; nothing is masked\n");
        return;
    }
    installed = 1;
}
