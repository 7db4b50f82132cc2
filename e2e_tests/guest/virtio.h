#ifndef VIRTIO_H
#define VIRTIO_H
#include "guest.h"
#include "pci.h"

#define VIRTIO_VENDOR 0x1AF4
/* modern device ids: 0x1040 + virtio device type; transitional ids in parentheses */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_BALLOON 5
#define VIRTIO_ID_VSOCK 19

#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_F_ACCESS_PLATFORM 33

#define VS_ACK 1
#define VS_DRIVER 2
#define VS_DRIVER_OK 4
#define VS_FEATURES_OK 8
#define VS_NEEDS_RESET 0x40
#define VS_FAILED 0x80

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4

#define IRQ_POLL 0
#define IRQ_MSIX 1
#define IRQ_INTX 2

struct vring_desc { u64 addr; u32 len; u16 flags, next; };
struct vring_avail { u16 flags, idx, ring[]; };
struct vring_used_elem { u32 id, len; };
struct vring_used { u16 flags, idx; struct vring_used_elem ring[]; };

struct vbuf { const void *addr; u32 len; };

#define VQ_MAX_INDIRECT 64
#define VQ_RAW_TOKEN ((void *)-1)

struct vdev;
struct virtq {
    struct vdev *dev;
    u16 index, size;
    volatile struct vring_desc *desc;
    volatile struct vring_avail *avail;
    volatile struct vring_used *used;
    u64 notify_addr;
    u16 free_head, num_free, last_used, avail_idx, kicked_idx;
    void **token;
    struct vring_desc *indirect; /* VQ_MAX_INDIRECT descriptors per head */
    int use_indirect, event_idx;
    int vector;                  /* interrupt vector counted in irq_count, or -1 */
    u64 irq_seen;
    u64 notifies, interrupts_waited;
};

struct vdev {
    struct pci_dev *pci;
    u16 type;
    u64 common, notify, isr, devcfg;
    u32 notify_mult;
    u64 offered, features;
    int irq_mode;
    u64 msix_table;
    u16 msix_entries;
    struct virtq vq[8];
    int nvq;
};

/* Find the nth virtio device of this type and reset it. Returns NULL if absent. */
struct vdev *virtio_find(u16 type, int nth);
/* Reset, ACK|DRIVER, negotiate (want & offered, VERSION_1 required), FEATURES_OK. */
int virtio_init(struct vdev *d, u64 want);
/* Configure queue i with up to max_size entries (0 = device maximum). */
struct virtq *virtio_queue(struct vdev *d, u16 i, u16 max_size);
void virtio_driver_ok(struct vdev *d);
/* Route config-change interrupts (call after the queues); their vector in irq_count, or -1. */
int virtio_config_irq(struct vdev *d);
void virtio_reset(struct vdev *d);
u8 virtio_status(struct vdev *d);
int virtio_has(struct vdev *d, int bit);
u8 virtio_cfg8(struct vdev *d, u32 off);
u16 virtio_cfg16(struct vdev *d, u32 off);
u32 virtio_cfg32(struct vdev *d, u32 off);
u64 virtio_cfg64(struct vdev *d, u32 off);
void virtio_cfg_w32(struct vdev *d, u32 off, u32 v);
/* Interrupt mode from the command line: irq=poll|msix|intx (default poll). */
int virtio_irq_mode(void);
/* irq_wait=hlt: vq_wait sleeps at CPL0 (hlt) between interrupts instead of spinning. */
extern int irq_wait_hlt;

/* Queue operations. add: out buffers (device-readable) then in buffers (device-writable). */
int vq_add(struct virtq *q, const struct vbuf *b, int nout, int nin, void *token);
void vq_kick(struct virtq *q);
void *vq_get(struct virtq *q, u32 *len);
/* Spin until a used element or the timeout (TSC ticks); returns token or NULL. */
void *vq_wait(struct virtq *q, u32 *len, u64 timeout);

#endif
