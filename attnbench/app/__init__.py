"""The front door: the `attnbench` command (cli), the verify runner and the pytest plugins its
test processes load (plugin, watchdog). The only layer that may import every other one."""
