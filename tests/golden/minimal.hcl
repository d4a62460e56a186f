# Nomad's defaults: x86_64, pc, tcg, ide; 300 MB.
job "minimal" {
  group "g" {
    task "vm" {
      driver = "qemu"
      config {
        image_path = "local/linux.img"
      }
    }
  }
}
