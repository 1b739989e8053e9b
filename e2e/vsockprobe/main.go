// Command vsockprobe reports whether this machine has working AF_VSOCK
// loopback (CID 1, VMADDR_CID_LOCAL): it listens on CID 1, dials itself and
// exchanges a few bytes. It prints "vsock loopback: available" and exits 0 on
// success; otherwise it prints the precise reason and exits 1.
//
// scripts/e2e.sh uses it to decide whether the end-to-end suite can run
// directly or must run inside a qemu micro-VM (scripts/vm/run.sh).
package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"
)

// localCID is VMADDR_CID_LOCAL, served by the vsock_loopback transport.
const localCID = 1

const timeout = 30 * time.Second

func main() {
	if err := probe(); err != nil {
		fmt.Printf("vsock loopback: unavailable: %v\n", err)
		os.Exit(1)
	}
	fmt.Println("vsock loopback: available")
}

func probe() error {
	if _, err := os.Stat("/dev/vsock"); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return errors.New("/dev/vsock missing (vsock kernel module not loaded)")
		}
		return fmt.Errorf("/dev/vsock: %w", err)
	}

	// Port 0 lets the kernel pick a free port (VMADDR_PORT_ANY).
	l, err := vsock.ListenContextID(localCID, 0, nil)
	if err != nil {
		return explain("bind CID 1", err)
	}
	defer l.Close()
	addr, ok := l.Addr().(*vsock.Addr)
	if !ok {
		return fmt.Errorf("listener address has unexpected type %T", l.Addr())
	}

	msg := []byte("nitrosign-vsockprobe")
	srvErr := make(chan error, 1)
	go func() { srvErr <- echoOnce(l, len(msg)) }()

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := vsock.DialContext(ctx, localCID, addr.Port, nil)
	if err != nil {
		return explain(fmt.Sprintf("dial CID 1 port %d", addr.Port), err)
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return fmt.Errorf("set deadline: %w", err)
	}
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("echo mismatch: sent %q, got %q", msg, got)
	}
	if err := <-srvErr; err != nil {
		return fmt.Errorf("server side: %w", err)
	}
	return nil
}

// echoOnce accepts one connection and echoes n bytes back.
func echoOnce(l *vsock.Listener, n int) error {
	if err := l.SetDeadline(time.Now().Add(timeout)); err != nil {
		return fmt.Errorf("set accept deadline: %w", err)
	}
	c, err := l.Accept()
	if err != nil {
		return fmt.Errorf("accept: %w", err)
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return fmt.Errorf("set deadline: %w", err)
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if _, err := c.Write(buf); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	return nil
}

// explain adds a hint for the errno values that identify a missing kernel
// feature.
func explain(op string, err error) error {
	var hint string
	switch {
	case errors.Is(err, unix.EADDRNOTAVAIL):
		hint = "cannot assign requested address (kernel lacks vsock_loopback)"
	case errors.Is(err, unix.EAFNOSUPPORT):
		hint = "address family not supported (kernel lacks AF_VSOCK)"
	case errors.Is(err, unix.ENODEV):
		hint = "no such device (no vsock transport for CID 1; kernel lacks vsock_loopback)"
	case errors.Is(err, unix.ECONNRESET), errors.Is(err, unix.ECONNREFUSED):
		hint = err.Error() + " (no vsock transport delivered the connection)"
	case errors.Is(err, context.DeadlineExceeded):
		hint = "timed out after " + timeout.String()
	default:
		return fmt.Errorf("%s: %w", op, err)
	}
	return fmt.Errorf("%s: %s", op, hint)
}
