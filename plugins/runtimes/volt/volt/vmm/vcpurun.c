/* KVM_RUN in a loop that answers the guest's hottest MMIO reads without Python.
 *
 * Why: every virtio interrupt makes Linux read the device's InterruptStatus
 * register, an exit to userspace that cannot be absorbed in the kernel (KVM's
 * ioeventfds only take writes). Handled in Python that read costs a GIL round
 * trip and tens of microseconds of interpreter on every request; here it is a
 * table lookup and a 4-byte copy. The values live in cells the transports keep
 * current (VirtioMmio._isr_cell); any other exit returns to Python as before.
 */
#include <errno.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>

struct vr_read { uint64_t addr; const uint32_t *value; };

/* Run until an exit Python must see: its exit reason, or -errno from KVM_RUN.
 * *answered counts the reads served from the table meanwhile. */
int vr_run(int fd, struct kvm_run *run, const struct vr_read *reads, int nreads,
           uint64_t *answered)
{
    for (;;) {
        if (ioctl(fd, KVM_RUN, 0) < 0)
            return -errno;
        if (run->exit_reason != KVM_EXIT_MMIO || run->mmio.is_write || run->mmio.len != 4)
            return (int)run->exit_reason;
        int i = 0;
        while (i < nreads && reads[i].addr != run->mmio.phys_addr)
            i++;
        if (i == nreads)
            return (int)run->exit_reason;
        uint32_t v = __atomic_load_n(reads[i].value, __ATOMIC_ACQUIRE);
        memcpy(run->mmio.data, &v, 4);
        (*answered)++;
    }
}
