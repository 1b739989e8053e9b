package proxy

import (
	"io"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// Socket I/O without the scheduler's system-call hand-off.
//
// Every read and write of the proxy's sockets is non-blocking: the
// runtime's poller waits for readiness, and the system call itself
// returns at once (data, or EAGAIN). A goroutine that enters a system
// call through syscall.Read or syscall.Write tells the scheduler first
// (entersyscall), and on an otherwise idle process that wakes the
// runtime's monitor thread, which then polls every 20 µs for a
// millisecond; at one call in flight that is a futex wake-up on the
// critical path of every read and tens of thread wake-ups per call on
// the machine's other cores. A non-blocking call needs none of it, so
// the proxy makes its socket reads and writes with syscall.RawSyscall,
// inside the connection's syscall.RawConn (which keeps the poller's
// deadlines and close semantics).

// sockReader reads a connection: with raw system calls when it is a
// socket (rc), else through the connection's own Read (TLS, in-memory).
// It notes when bytes arrived (keepalive). One goroutine reads it.
type sockReader struct {
	nc   net.Conn
	rc   syscall.RawConn
	last *atomic.Int64

	// The current Read's buffer and result, for readFn (allocated once).
	p      []byte
	n      int
	err    error
	readFn func(fd uintptr) bool
}

func newSockReader(nc net.Conn, last *atomic.Int64) *sockReader {
	r := &sockReader{nc: nc, rc: rawConnOf(nc), last: last}
	r.readFn = r.readFd
	return r
}

func (r *sockReader) Read(p []byte) (int, error) {
	var n int
	var err error
	if r.rc == nil || len(p) == 0 {
		n, err = r.nc.Read(p)
	} else {
		r.p, r.n, r.err = p, 0, nil
		if err = r.rc.Read(r.readFn); err == nil {
			n, err = r.n, r.err
		}
		r.p = nil
	}
	if n > 0 {
		r.last.Store(time.Now().UnixNano())
	}
	return n, err
}

// readFd is one non-blocking read; false: nothing to read yet (the poller
// waits, then calls it again).
func (r *sockReader) readFd(fd uintptr) bool {
	for {
		n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(unsafe.SliceData(r.p))), uintptr(len(r.p)))
		switch e {
		case 0:
			r.n = int(n)
			if n == 0 {
				r.err = io.EOF
			}
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		default:
			r.err = opError("read", r.nc, e)
			return true
		}
	}
}

// sockWriter writes what a socket takes now, never waiting; the flusher
// goroutine writes the rest. Used under its endpoint's lock.
type sockWriter struct {
	nc      net.Conn
	rc      syscall.RawConn
	p       []byte
	n       int
	err     error
	writeFn func(fd uintptr) bool
}

func newSockWriter(nc net.Conn, rc syscall.RawConn) *sockWriter {
	w := &sockWriter{nc: nc, rc: rc}
	w.writeFn = w.writeFd
	return w
}

// writeNow writes what the socket takes of p now, without waiting.
func (w *sockWriter) writeNow(p []byte) (int, error) {
	w.p, w.n, w.err = p, 0, nil
	err := w.rc.Write(w.writeFn)
	n := w.n
	if err == nil {
		err = w.err
	}
	w.p, w.err = nil, nil
	return n, err
}

func (w *sockWriter) writeFd(fd uintptr) bool {
	for w.n < len(w.p) {
		rest := w.p[w.n:]
		m, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(unsafe.SliceData(rest))), uintptr(len(rest)))
		switch e {
		case 0:
			if m == 0 {
				return true
			}
			w.n += int(m)
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return true // the rest is the flusher's
		default:
			w.err = opError("write", w.nc, e)
			return true
		}
	}
	return true
}

// opError describes a failed read or write as the net package does.
func opError(op string, nc net.Conn, e syscall.Errno) error {
	return &net.OpError{Op: op, Net: nc.LocalAddr().Network(), Source: nc.LocalAddr(), Addr: nc.RemoteAddr(), Err: os.NewSyscallError(op, e)}
}
