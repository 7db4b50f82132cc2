#ifndef BLK_H
#define BLK_H
#include "virtio.h"

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8

struct blk_hdr { u32 type, reserved; u64 sector; };

struct blk {
    struct vdev *d;
    struct virtq *q;
    u64 capacity; /* 512-byte sectors */
    u32 seg_max, size_max;
    int ro, flush;
};

struct blk *blk_open(int nth); /* fails the scenario if there is no such disk */
int blk_setup(struct blk *b);  /* (re)initialise the device; 0 on success */
/* Synchronous request; returns the virtio status byte (0 = OK) or -1 on timeout. */
int blk_rw(struct blk *b, u32 type, u64 sector, void *buf, u32 len);

#endif
