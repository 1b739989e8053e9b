package attest

import (
	"os"

	"golang.org/x/sys/unix"
)

// reseedCRNG asks the kernel to reseed its CRNG from the input pool now
// (RNDRESEEDCRNG, Linux >= 4.17), so the NSM bytes just written take effect
// before the signer generates keys.
func reseedCRNG(f *os.File) error {
	conn, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ioctlErr error
	if err := conn.Control(func(fd uintptr) {
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, unix.RNDRESEEDCRNG, 0)
		if errno != 0 {
			ioctlErr = errno
		}
	}); err != nil {
		return err
	}
	return ioctlErr
}
