package sdnotify_test

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/nitrosign/nitrosign/host/sdnotify"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakePool plays the pool's readiness.
type fakePool struct {
	mu    sync.Mutex
	ready int
	subs  []func(int)
}

func (f *fakePool) OnStateChange(fn func(int)) {
	f.mu.Lock()
	f.subs = append(f.subs, fn)
	n := f.ready
	f.mu.Unlock()
	fn(n)
}

func (f *fakePool) Size() int { return 4 }

func (f *fakePool) set(n int) {
	f.mu.Lock()
	f.ready = n
	subs := append([]func(int){}, f.subs...)
	f.mu.Unlock()
	for _, fn := range subs {
		fn(n)
	}
}

// fakeSystemd is a unixgram NOTIFY_SOCKET that collects datagrams.
type fakeSystemd struct {
	conn *net.UnixConn
	msgs chan string
}

func newFakeSystemd(t *testing.T, watchdog time.Duration) *fakeSystemd {
	t.Helper()
	// t.TempDir paths can pass the 108-byte limit of a socket path.
	dir, err := os.MkdirTemp("", "sdn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeSystemd{conn: conn, msgs: make(chan string, 1000)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			f.msgs <- string(buf[:n])
		}
	}()
	t.Cleanup(func() { conn.Close(); <-done })
	t.Setenv("NOTIFY_SOCKET", path)
	if watchdog > 0 {
		t.Setenv("WATCHDOG_USEC", strconv.FormatInt(watchdog.Microseconds(), 10))
		t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	} else {
		t.Setenv("WATCHDOG_USEC", "")
	}
	return f
}

// next returns the next datagram that contains want, failing after 5 s;
// it returns what was skipped on the way.
func (f *fakeSystemd) next(t *testing.T, want string) (string, []string) {
	t.Helper()
	var skipped []string
	deadline := time.After(5 * time.Second)
	for {
		select {
		case m := <-f.msgs:
			if strings.Contains(m, want) {
				return m, skipped
			}
			skipped = append(skipped, m)
		case <-deadline:
			t.Fatalf("no %q from the notifier; got %q", want, skipped)
		}
	}
}

func TestReadyOnlyOnceUpstreamReady(t *testing.T) {
	sd := newFakeSystemd(t, 0)
	p := &fakePool{}
	n := sdnotify.New(p, nil, zaptest.NewLogger(t))
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	first, _ := sd.next(t, "STATUS=")
	if strings.Contains(first, "READY=1") || !strings.Contains(first, "0/4") {
		t.Fatalf("with no ready connection the notifier sent %q", first)
	}
	p.set(1)
	m, _ := sd.next(t, "READY=1")
	if !strings.Contains(m, "STATUS=1/4 upstream connections ready") {
		t.Fatalf("READY datagram %q lacks the status", m)
	}
	p.set(0)
	p.set(2)
	m, skipped := sd.next(t, "STATUS=2/4")
	if strings.Contains(m, "READY=1") || len(skipped) != 1 || strings.Contains(skipped[0], "READY=1") {
		t.Fatalf("READY=1 sent again: %q then %q", skipped, m)
	}
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
	sd.next(t, "STOPPING=1")
	p.set(3) // after Stop: nothing more
	select {
	case m := <-sd.msgs:
		t.Fatalf("sent %q after Stop", m)
	case <-time.After(100 * time.Millisecond):
	}
}

func TestWatchdog(t *testing.T) {
	sd := newFakeSystemd(t, 200*time.Millisecond) // pings every 100 ms
	var dead atomic.Bool
	n := sdnotify.New(&fakePool{ready: 1}, func() error {
		if dead.Load() {
			return errors.New("not serving")
		}
		return nil
	}, zaptest.NewLogger(t))
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	sd.next(t, "READY=1")
	start := time.Now()
	for range 3 {
		sd.next(t, "WATCHDOG=1")
	}
	if el := time.Since(start); el < 200*time.Millisecond {
		t.Fatalf("3 pings in %v: faster than every half interval", el)
	}
	dead.Store(true)
	// Drain a ping that may already be on its way, then expect silence.
	time.Sleep(150 * time.Millisecond)
	for len(sd.msgs) > 0 {
		<-sd.msgs
	}
	select {
	case m := <-sd.msgs:
		t.Fatalf("pinged %q while not alive", m)
	case <-time.After(300 * time.Millisecond):
	}
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
	sd.next(t, "STOPPING=1")
}

func TestWatchdogOtherPID(t *testing.T) {
	sd := newFakeSystemd(t, 100*time.Millisecond)
	t.Setenv("WATCHDOG_PID", "1") // the watchdog is someone else's
	n := sdnotify.New(&fakePool{ready: 1}, nil, zaptest.NewLogger(t))
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	sd.next(t, "READY=1")
	select {
	case m := <-sd.msgs:
		t.Fatalf("sent %q: the watchdog is not ours", m)
	case <-time.After(300 * time.Millisecond):
	}
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
}

func TestNoSocketNoOp(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("WATCHDOG_USEC", "1000")
	p := &fakePool{ready: 1}
	n := sdnotify.New(p, nil, zaptest.NewLogger(t))
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	if len(p.subs) != 0 {
		t.Fatal("subscribed to readiness without NOTIFY_SOCKET")
	}
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
}

func TestBadWatchdogEnv(t *testing.T) {
	newFakeSystemd(t, 0)
	t.Setenv("WATCHDOG_USEC", "soon")
	if err := sdnotify.New(&fakePool{}, nil, zaptest.NewLogger(t)).Start(); err == nil {
		t.Fatal("Start accepted WATCHDOG_USEC=soon")
	}
}
