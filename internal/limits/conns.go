package limits

import (
	"errors"
	"net"
	"sync"
	"time"
)

// Conns serves the connections of a bounded listener, each in a goroutine
// of its own, and ends them all on Close: the accept loop of the small
// servers on the parent (enclave logs, the KMS forwarder). The zero value
// is ready to use.
type Conns struct {
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// Report is told, at most once a second, of a connection refused beyond
// the bound (err nil; open connections, and refusals since the last
// report) or of an accept error (err set; Serve goes on after a backoff).
type Report func(err error, open int64, refused uint64)

// Serve accepts on l, at most max connections at once (one more is closed
// at once), and runs handle for each; the connection is closed when handle
// returns. It returns nil once l or t is closed.
func (t *Conns) Serve(l net.Listener, max int, report Report, handle func(net.Conn)) error {
	th := NewThrottle(time.Second)
	l = NewListener(l, max, func(open int64) {
		if ok, more := th.Allow(); ok {
			report(nil, open, more+1)
		}
	})
	backoff := 5 * time.Millisecond
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of file descriptors and the like: wait and go on.
			if ok, _ := th.Allow(); ok {
				report(err, 0, 0)
			}
			time.Sleep(backoff)
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		t.mu.Lock()
		if t.closed {
			t.mu.Unlock()
			_ = c.Close()
			return nil
		}
		t.trackLocked(c)
		t.wg.Add(1)
		t.mu.Unlock()
		go func() {
			defer t.wg.Done()
			defer t.Untrack(c)
			defer c.Close()
			handle(c)
		}()
	}
}

// Track registers c to be closed by Close (a connection a handler opened
// itself); false, and c not registered, once Close ran.
func (t *Conns) Track(c net.Conn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	t.trackLocked(c)
	return true
}

func (t *Conns) trackLocked(c net.Conn) {
	if t.conns == nil {
		t.conns = map[net.Conn]struct{}{}
	}
	t.conns[c] = struct{}{}
}

// Untrack forgets c.
func (t *Conns) Untrack(c net.Conn) {
	t.mu.Lock()
	delete(t.conns, c)
	t.mu.Unlock()
}

// Close closes every tracked connection, takes no new one, and waits for
// the handlers Serve started. The listener is the caller's to close.
func (t *Conns) Close() {
	t.mu.Lock()
	t.closed = true
	for c := range t.conns {
		_ = c.Close()
	}
	t.mu.Unlock()
	t.wg.Wait()
}
