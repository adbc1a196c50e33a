/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/*
 * The hmmgpu device interface for C: generated from device/abi/src/abi.rs
 * by the hmmgpu-abi crate's tests (HMMGPU_BLESS=1 cargo test -p hmmgpu-abi
 * rewrites it). Do not edit; see docs/device-spec.md.
 */
#ifndef HMMGPU_ABI_H
#define HMMGPU_ABI_H

#define HMMGPU_VIRTIO_ID                 63u	/* virtio device id */
#define HMMGPU_PCI_DEVICE_ID             4223u	/* modern virtio-pci device id */
#define HMMGPU_SHM_ID_VRAM               0u	/* virtio shared memory region of the VRAM */
#define HMMGPU_QUEUE_COMMAND             0u	/* command virtqueue index */
#define HMMGPU_QUEUE_EVENT               1u	/* event virtqueue index */
#define HMMGPU_NUM_QUEUES                2u	/* virtqueues */
#define HMMGPU_QUEUE_SIZE                1024u	/* most descriptors per virtqueue */
#define HMMGPU_PAGE_SIZE                 4096u	/* device page size */
#define HMMGPU_HUGE_PAGE_SIZE            2097152u	/* huge device MMU entry */
#define HMMGPU_CONFIG_MAGIC              0x474d4d48u	/* DeviceConfig.magic ("HMMG") */
#define HMMGPU_ABI_VERSION               1u	/* DeviceConfig.version */
#define HMMGPU_MAX_RANGES                4096u	/* most ranges per command */
#define HMMGPU_MAX_CONTEXTS              4096u	/* device MMU contexts are 1..=this */
#define HMMGPU_CONFIG_SIZE               32u	/* bytes of the config space */
#define HMMGPU_CONFIG_OFF_MAGIC          0u
#define HMMGPU_CONFIG_OFF_VERSION        4u
#define HMMGPU_CONFIG_OFF_VRAM_SIZE      8u
#define HMMGPU_CONFIG_OFF_PAGE_SIZE      16u
#define HMMGPU_CONFIG_OFF_MAX_RANGES     20u
#define HMMGPU_CONFIG_OFF_MAX_CONTEXTS   24u
#define HMMGPU_CMD_HEADER_SIZE           24u	/* bytes of a command header */
#define HMMGPU_CMD_OFF_OPCODE            0u
#define HMMGPU_CMD_OFF_CTX               4u
#define HMMGPU_CMD_OFF_TAG               8u
#define HMMGPU_CMD_OFF_COUNT             16u
#define HMMGPU_CMD_OFF_RESERVED          20u
#define HMMGPU_RANGE_SIZE                24u	/* bytes of a range */
#define HMMGPU_RANGE_OFF_SRC             0u
#define HMMGPU_RANGE_OFF_DST             8u
#define HMMGPU_RANGE_OFF_LEN             16u
#define HMMGPU_RANGE_OFF_FLAGS           20u
#define HMMGPU_RANGE_SRC_VRAM            1u	/* Range.flags */
#define HMMGPU_RANGE_DST_VRAM            2u	/* Range.flags */
#define HMMGPU_RANGE_MAP_READ            16u	/* Range.flags */
#define HMMGPU_RANGE_MAP_WRITE           32u	/* Range.flags */
#define HMMGPU_RANGE_MAP_ATOMIC          64u	/* Range.flags */
#define HMMGPU_RANGE_MAP_HUGE            128u	/* Range.flags */
#define HMMGPU_RANGE_ATOMIC_ADD          256u	/* Range.flags */
#define HMMGPU_RANGE_ATOMIC_XCHG         512u	/* Range.flags */
#define HMMGPU_RESPONSE_SIZE             16u	/* bytes of a response */
#define HMMGPU_RESPONSE_OFF_STATUS       0u
#define HMMGPU_RESPONSE_OFF_FAILED_INDEX 4u
#define HMMGPU_RESPONSE_OFF_BYTES        8u
#define HMMGPU_EVENT_SIZE                32u	/* bytes of an event buffer */
#define HMMGPU_EVENT_FAULT               1u	/* Event.kind */
#define HMMGPU_EVENT_ECC                 2u	/* Event.kind */
#define HMMGPU_EVENT_RESTARTED           3u	/* Event.kind */
#define HMMGPU_COUNTERS_SIZE             128u	/* bytes COUNTERS writes */
#define HMMGPU_OP_NOP                    0u
#define HMMGPU_OP_COPY                   1u
#define HMMGPU_OP_FILL                   2u
#define HMMGPU_OP_CTX_CREATE             16u
#define HMMGPU_OP_CTX_DESTROY            17u
#define HMMGPU_OP_MAP                    18u
#define HMMGPU_OP_UNMAP                  19u
#define HMMGPU_OP_VREAD                  20u
#define HMMGPU_OP_VWRITE                 21u
#define HMMGPU_OP_ATOMIC                 22u
#define HMMGPU_OP_REPLAY                 24u
#define HMMGPU_OP_CANCEL                 25u
#define HMMGPU_OP_COUNTERS               26u
#define HMMGPU_STATUS_OK                 0u
#define HMMGPU_STATUS_UNSUPPORTED        1u
#define HMMGPU_STATUS_BAD_REQUEST        2u
#define HMMGPU_STATUS_BAD_GUEST_ADDR     3u
#define HMMGPU_STATUS_BAD_VRAM_RANGE     4u
#define HMMGPU_STATUS_COPY_ERROR         5u
#define HMMGPU_STATUS_FAULT              6u
#define HMMGPU_STATUS_BAD_CONTEXT        7u

#endif /* HMMGPU_ABI_H */
