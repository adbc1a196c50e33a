// SPDX-License-Identifier: GPL-2.0
/*
 * virtio. Exists because kernel::bindings has no virtio: the driver and id
 * tables the virtio core wants in C (callbacks in ffi.rs), the virtqueue
 * callback, one function per static inline or config op. Rust declares the
 * exported ones (shim.rs), checked below. The queue logic is in queue.rs.
 */
#include <linux/module.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>

#include "hmmgpu.h"
#include "hmmgpu_abi.h"

static const struct virtio_device_id hmmgpu_id_table[] = {
	{ HMMGPU_VIRTIO_ID, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, hmmgpu_id_table);

struct virtio_driver hmmgpu_virtio_driver = {
	.driver.name = KBUILD_MODNAME,
	.id_table = hmmgpu_id_table,
	.probe = hmmgpu_rust_probe,
	.remove = hmmgpu_rust_remove,
	.reset_prepare = hmmgpu_rust_reset_prepare,
	.reset_done = hmmgpu_rust_reset_done,
};

static void hmmgpu_vq_done(struct virtqueue *vq)
{
	hmmgpu_rust_vq_interrupt(dev_get_drvdata(&vq->vdev->dev), vq->index);
}

/* The command and event queues, in the device's queue order. */
int hmmgpu_virtio_find_vqs(struct virtio_device *vdev, struct virtqueue **vqs)
{
	struct virtqueue_info infos[] = {
		{ "command", hmmgpu_vq_done }, { "event", hmmgpu_vq_done },
	};

	return virtio_find_vqs(vdev, ARRAY_SIZE(infos), vqs, infos, NULL);
}

struct device *hmmgpu_virtio_dev(struct virtio_device *vdev)
{
	return &vdev->dev;
}

/* An IOMMU between device and memory: commands carry physical addresses. */
bool hmmgpu_virtio_has_access_platform(struct virtio_device *vdev)
{
	return virtio_has_feature(vdev, VIRTIO_F_ACCESS_PLATFORM);
}

void hmmgpu_virtio_read_config(struct virtio_device *vdev, unsigned int offset,
			       void *buf, size_t len)
{
	virtio_cread_bytes(vdev, offset, buf, len);
}

bool hmmgpu_virtio_shm_region(struct virtio_device *vdev, u8 id, u64 *addr,
			      u64 *len)
{
	struct virtio_shm_region region;

	if (!virtio_get_shm_region(vdev, &region, id))
		return false;
	*addr = region.addr;
	*len = region.len;
	return true;
}

void hmmgpu_virtio_ready(struct virtio_device *vdev)
{
	virtio_device_ready(vdev);
}

int hmmgpu_virtio_finalize_features(struct virtio_device *vdev)
{
	return vdev->config->finalize_features(vdev);
}

u8 hmmgpu_virtio_status(struct virtio_device *vdev)
{
	return vdev->config->get_status(vdev);
}

void hmmgpu_virtio_del_vqs(struct virtio_device *vdev)
{
	vdev->config->del_vqs(vdev);
}

/* The virtio constants Rust uses (uapi/linux/virtio_config.h). */
const u8 hmmgpu_VIRTIO_S_ACKNOWLEDGE = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const u8 hmmgpu_VIRTIO_S_DRIVER = VIRTIO_CONFIG_S_DRIVER;
const u8 hmmgpu_VIRTIO_S_FEATURES_OK = VIRTIO_CONFIG_S_FEATURES_OK;

/* The prototypes shim.rs declares. */
static_assert(__same_type(&virtqueue_add_sgs,
	int (*)(struct virtqueue *, struct scatterlist **, unsigned int,
		unsigned int, void *, gfp_t)));
static_assert(__same_type(&virtqueue_add_inbuf,
	int (*)(struct virtqueue *, struct scatterlist *, unsigned int, void *,
		gfp_t)));
static_assert(__same_type(&virtqueue_get_buf,
	void *(*)(struct virtqueue *, unsigned int *)));
static_assert(__same_type(&virtqueue_detach_unused_buf,
	void *(*)(struct virtqueue *)));
static_assert(__same_type(&virtqueue_kick_prepare, bool (*)(struct virtqueue *)) &&
	      __same_type(&virtqueue_notify, bool (*)(struct virtqueue *)) &&
	      __same_type(&virtqueue_enable_cb, bool (*)(struct virtqueue *)) &&
	      __same_type(&virtqueue_disable_cb, void (*)(struct virtqueue *)));
static_assert(__same_type(&virtio_reset_device, void (*)(struct virtio_device *)) &&
	      __same_type(&virtio_add_status,
			  void (*)(struct virtio_device *, unsigned int)));
static_assert(__same_type(&__register_virtio_driver,
			  int (*)(struct virtio_driver *, struct module *)) &&
	      __same_type(&unregister_virtio_driver,
			  void (*)(struct virtio_driver *)));
