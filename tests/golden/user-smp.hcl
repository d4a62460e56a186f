# A -smp in args suppresses the automatic one; an ISO boots as a CD.
job "smp" {
  group "g" {
    task "installer" {
      driver = "qemu"
      config {
        image_path = "local/install.iso"
        args       = ["--smp", "4"]
      }
      resources {
        memory = 2048
        cores  = 2
      }
    }
  }
}
