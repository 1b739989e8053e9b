// Package sdnotify tells systemd about the proxy (Type=notify services):
// READY=1 once the upstream pool has a READY connection (so `systemctl
// start` and units ordered After= the proxy wait until it can actually
// serve), STATUS= lines as the number of ready connections changes,
// WATCHDOG=1 pings at half of WatchdogSec while the proxy is alive, and
// STOPPING=1 when it begins to stop.
//
// It uses github.com/coreos/go-systemd/v22/daemon. Without NOTIFY_SOCKET
// in the environment (not started by systemd, or Type= is not notify)
// everything is a no-op.
package sdnotify

import (
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"
)

// Readiness is what the notifier follows (*pool.Pool).
type Readiness interface {
	// OnStateChange calls fn with the number of READY connections now and
	// at every change.
	OnStateChange(fn func(ready int))
	// Size is the number of connections.
	Size() int
}

// Notifier sends the notifications. Create it with New, then Start and
// Stop; both are no-ops without NOTIFY_SOCKET.
type Notifier struct {
	r     Readiness
	alive func() error
	log   *zap.Logger

	mu       sync.Mutex
	enabled  bool
	ready    bool // READY=1 sent
	stopped  bool
	warned   bool // a send error was logged
	stopPing chan struct{}
	pingDone chan struct{}
}

// New makes a notifier for r. alive, when not nil, is asked before each
// watchdog ping: an error skips the ping (and is logged), so that systemd
// restarts a proxy that stopped serving. It should not depend on the
// enclave: restarting the proxy does not bring an enclave back.
func New(r Readiness, alive func() error, log *zap.Logger) *Notifier {
	if log == nil {
		log = zap.NewNop()
	}
	return &Notifier{r: r, alive: alive, log: log.Named("sdnotify")}
}

// Start begins following readiness and, when systemd set WatchdogSec=,
// pinging the watchdog. It never blocks.
func (n *Notifier) Start() error {
	if os.Getenv("NOTIFY_SOCKET") == "" {
		n.log.Debug("NOTIFY_SOCKET unset: not notifying systemd")
		return nil
	}
	interval, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		return fmt.Errorf("sdnotify: systemd watchdog: %w", err)
	}
	n.mu.Lock()
	n.enabled = true
	n.mu.Unlock()
	n.r.OnStateChange(n.readyChanged)
	if interval > 0 {
		n.mu.Lock()
		n.stopPing, n.pingDone = make(chan struct{}), make(chan struct{})
		n.mu.Unlock()
		go n.ping(interval / 2)
		n.log.Info("systemd watchdog enabled", zap.Duration("watchdog_sec", interval), zap.Duration("ping_every", interval/2))
	}
	return nil
}

// readyChanged sends READY=1 the first time a connection is ready, and a
// STATUS line at every change.
func (n *Notifier) readyChanged(ready int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.enabled || n.stopped {
		return
	}
	state := fmt.Sprintf("STATUS=%d/%d upstream connections ready", ready, n.r.Size())
	if ready == 0 {
		state += " (enclave unreachable or not serving)"
	}
	if ready > 0 && !n.ready {
		n.ready = true
		state = daemon.SdNotifyReady + "\n" + state
		n.log.Info("told systemd the proxy is ready", zap.Int("ready_upstream_conns", ready))
	}
	n.sendLocked(state)
}

func (n *Notifier) ping(every time.Duration) {
	defer close(n.pingDone)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-n.stopPing:
			return
		case <-t.C:
		}
		if n.alive != nil {
			if err := n.alive(); err != nil {
				n.log.Warn("watchdog ping skipped: proxy not alive; systemd will restart it", zap.Error(err))
				continue
			}
		}
		n.mu.Lock()
		n.sendLocked(daemon.SdNotifyWatchdog)
		n.mu.Unlock()
	}
}

// Stop sends STOPPING=1 and ends the watchdog pings.
func (n *Notifier) Stop() error {
	n.mu.Lock()
	if !n.enabled || n.stopped {
		n.mu.Unlock()
		return nil
	}
	n.stopped = true
	n.sendLocked(daemon.SdNotifyStopping)
	stop, done := n.stopPing, n.pingDone
	n.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
	return nil
}

func (n *Notifier) sendLocked(state string) {
	if _, err := daemon.SdNotify(false, state); err != nil && !n.warned {
		n.warned = true
		n.log.Warn("cannot notify systemd (logged once)", zap.Error(err))
	}
}
