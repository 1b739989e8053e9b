package limits

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Listener bounds the connections open at once. A connection beyond the
// bound is accepted and closed at once, before any byte is read or written
// (before a TLS handshake too), and Accept goes on to the next one: the peer
// sees its connection closed (a gRPC client: Unavailable, then its own
// reconnect backoff), and the server spends one accept and one close on it.
//
// Why accept and close rather than stop accepting: a listener that stops
// accepting leaves new connections in the kernel's backlog, where their
// clients hang until their own connect or handshake timeout, with nothing
// logged or counted here; closing answers at once, and is logged and
// counted by the caller (OnReject).
type Listener struct {
	net.Listener
	max      int64
	open     atomic.Int64
	rejected atomic.Uint64
	onReject func(open int64)
}

// NewListener bounds l to max (>= 1) open connections. onReject, if not
// nil, is called for each connection closed at once, with the number open;
// it runs on the accepting goroutine and must be quick.
func NewListener(l net.Listener, max int, onReject func(open int64)) *Listener {
	if max < 1 {
		max = 1
	}
	return &Listener{Listener: l, max: int64(max), onReject: onReject}
}

// Accept returns the next connection within the bound; connections beyond
// it are closed and skipped. Its errors are the wrapped listener's.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if n := l.open.Add(1); n > l.max {
			l.open.Add(-1)
			l.rejected.Add(1)
			_ = c.Close()
			if l.onReject != nil {
				l.onReject(n - 1)
			}
			continue
		}
		return &limitedConn{Conn: c, l: l}, nil
	}
}

// Open is the number of connections accepted and not yet closed.
func (l *Listener) Open() int64 { return l.open.Load() }

// Rejected is the number of connections closed at once so far.
func (l *Listener) Rejected() uint64 { return l.rejected.Load() }

// Max is the bound.
func (l *Listener) Max() int64 { return l.max }

// limitedConn gives its slot back once, on its first Close.
type limitedConn struct {
	net.Conn
	l    *Listener
	once sync.Once
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.open.Add(-1) })
	return err
}

// SyscallConn is the wrapped connection's, so that a server can read and
// write it with raw non-blocking system calls (syscall.Conn);
// errors.ErrUnsupported when the wrapped connection has none.
func (c *limitedConn) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := c.Conn.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, errors.ErrUnsupported
}

// CloseWrite half-closes the wrapped connection when it can (TCP, vsock),
// so a relay can pass one side's end of stream to the other; else it
// closes it.
func (c *limitedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}

// Throttle lets an event through at most once per interval and counts the
// ones it held back, so a flood (of refused connections, of shed calls)
// makes one log line a second, not one per event.
type Throttle struct {
	every      time.Duration
	next       atomic.Int64 // unix nanos before which events are held back
	suppressed atomic.Uint64
	now        func() time.Time
}

// NewThrottle lets one event per every through.
func NewThrottle(every time.Duration) *Throttle {
	return &Throttle{every: every, now: time.Now}
}

// Allow reports whether this event may be logged, and how many were held
// back since the last one allowed.
func (t *Throttle) Allow() (ok bool, suppressed uint64) {
	now := t.now().UnixNano()
	next := t.next.Load()
	if now < next || !t.next.CompareAndSwap(next, now+int64(t.every)) {
		t.suppressed.Add(1)
		return false, 0
	}
	return true, t.suppressed.Swap(0)
}
