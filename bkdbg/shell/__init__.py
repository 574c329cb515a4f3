"""The terminal side: raw-TTY forwarding, the cmd2 monitor and run-script."""
