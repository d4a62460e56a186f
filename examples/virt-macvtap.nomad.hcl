# nomad-driver-virt's macvtap example: the VM gets a macvtap on a host device and
# its own address on that device's network (no Nomad ports apply). The device
# must be listed in the host config's allowed_devices.
#   vmdriver run examples/virt-macvtap.nomad.hcl --host-config examples/virt-host.hcl
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
          source {
            image = "local/disk.qcow2"
          }
        }

        network_interface {
          macvtap {
            device = "eth0"
            mode   = "bridge"
          }
        }
      }
    }
  }
}
