# Every qemu config field, group and task networks, ports forwarded by label order.
job "full" {
  group "web" {
    network {
      port "ssh" {
        static = 2222
      }
      port "http" {
        static = 8080
        to     = 80
      }
      dns {
        servers  = ["10.0.2.3"]
        searches = ["example.internal"]
      }
    }
    task "vm" {
      driver = "qemu"
      config {
        image_path        = "local/disk,1.qcow2"
        emulator          = "qemu-system-x86_64"
        machine_type      = "q35"
        accelerator       = "tcg"
        drive_interface   = "virtio"
        graceful_shutdown = true
        guest_agent       = true
        port_map {
          ssh  = 22
          http = 80
        }
        args = ["-nodefaults", "-vga", "none", "-drive", "file=${NOMAD_TASK_DIR}/data.img,if=virtio,format=raw"]
      }
      resources {
        memory = 1024
        cores  = 2
      }
      kill_timeout = "45s"
      kill_signal  = "SIGTERM"
    }
  }
}
