# nomad-driver-virt's chained-image example: the image becomes one shared base
# volume per content (hash), and every task chained to it gets an overlay. The
# base goes when its last overlay does.
#   vmdriver run examples/virt-chained-image.nomad.hcl --host-config examples/virt-host.hcl
job "python-server" {
  group "virt-group" {
    task "virt-task" {
      artifact {
        source      = "../guest/out/disk.qcow2"
        destination = "local/disk.qcow2"
        mode        = "file"
      }

      driver = "virt"

      config {
        disk {
          size    = "10GiB"
          pool    = "local"
          chained = true
          source {
            image = "local/disk.qcow2"
          }
        }
      }
    }
  }
}
