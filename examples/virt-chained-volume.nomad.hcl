# nomad-driver-virt's chained example: a copy-on-write overlay on a golden volume
# of the pool (created in milliseconds; the volume itself is never written).
#   cp guest/out/disk.qcow2 /var/lib/virt/storage/test-guest.qcow2
#   vmdriver run examples/virt-chained-volume.nomad.hcl --host-config examples/virt-host.hcl
job "python-server" {
  group "virt-group" {
    task "virt-task" {
      driver = "virt"

      config {
        disk {
          size    = "10GiB"
          pool    = "local"
          chained = true
          source {
            volume = "test-guest.qcow2"
          }
        }
      }
    }
  }
}
