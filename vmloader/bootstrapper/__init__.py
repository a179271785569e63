"""Worker-side half of vmloader: detection, images, VMs, jobs, snapshots."""
