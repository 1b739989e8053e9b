// Package kmsforward relays the enclave's connections to AWS KMS: an
// enclave has no network, so its KMS client (aws-sdk-go-v2) dials the
// parent over vsock, and the parent relays the bytes to the one configured
// endpoint, kms.REGION.amazonaws.com:443, and nowhere else: the enclave
// does not choose the destination, as with AWS's own vsock-proxy and its
// allow-list. TLS runs end to end between the enclave and KMS, so the
// parent sees ciphertext only; it never reads or changes the bytes.
//
// Anything on the parent can connect to the vsock port too, which reaches
// nothing it could not reach itself; the relay is still bounded: a number
// of connections at once, a dial timeout, and an idle timeout.
package kmsforward

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/internal/limits"
)

// Defaults of Config.
const (
	DefaultMaxConns    = 64
	DefaultDialTimeout = 10 * time.Second
	DefaultIdleTimeout = 5 * time.Minute
)

// Config is what the forwarder relays to and its bounds.
type Config struct {
	// Destination is the one HOST:PORT connections are relayed to, e.g.
	// kms.eu-west-1.amazonaws.com:443. Required.
	Destination string
	// MaxConns bounds the relayed connections at once; one more is closed
	// at once. Default 64 (the enclave's KMS client holds a few).
	MaxConns int
	// DialTimeout bounds the connection to Destination. Default 10s.
	DialTimeout time.Duration
	// IdleTimeout closes a relayed connection with no byte either way for
	// this long. Default 5m.
	IdleTimeout time.Duration
}

// Validate reports what is wrong with c.
func (c Config) Validate() error {
	host, port, err := net.SplitHostPort(c.Destination)
	if err != nil || host == "" {
		return fmt.Errorf("KMS endpoint %q: want HOST:PORT, e.g. kms.eu-west-1.amazonaws.com:443", c.Destination)
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return fmt.Errorf("KMS endpoint %q: port must be 1-65535", c.Destination)
	}
	if c.MaxConns < 0 || c.DialTimeout < 0 || c.IdleTimeout < 0 {
		return errors.New("KMS forwarder: limits must not be negative")
	}
	return nil
}

// Forwarder relays connections to Config.Destination.
type Forwarder struct {
	cfg  Config
	log  *zap.Logger
	dial func(ctx context.Context, network, addr string) (net.Conn, error)

	conns  limits.Conns
	ctx    context.Context // cancelled by Close: ends dials in progress
	cancel context.CancelFunc
}

// New returns a Forwarder for cfg.
func New(cfg Config, log *zap.Logger) (*Forwarder, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.MaxConns == 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	d := &net.Dialer{Timeout: cfg.DialTimeout}
	ctx, cancel := context.WithCancel(context.Background())
	return &Forwarder{cfg: cfg, log: log.Named("kmsforward"), dial: d.DialContext, ctx: ctx, cancel: cancel}, nil
}

// Serve relays every connection l accepts until l is closed (then nil).
func (f *Forwarder) Serve(l net.Listener) error {
	return f.conns.Serve(l, f.cfg.MaxConns, func(err error, open int64, refused uint64) {
		if err != nil {
			f.log.Warn("KMS forwarder: accept failed", zap.Error(err))
			return
		}
		f.log.Warn("KMS forwarder: connection refused, too many open", zap.Int64("open", open),
			zap.Int("limit", f.cfg.MaxConns), zap.Uint64("refused_since_last_line", refused))
	}, f.relay)
}

// Close ends every relayed connection and dials in progress, and waits
// for them. The listener is the caller's to close.
func (f *Forwarder) Close() {
	f.cancel()
	f.conns.Close()
}

// relay copies bytes both ways between c and the destination until either
// side ends or both are idle for IdleTimeout.
func (f *Forwarder) relay(c net.Conn) {
	ctx, cancel := context.WithTimeout(f.ctx, f.cfg.DialTimeout)
	up, err := f.dial(ctx, "tcp", f.cfg.Destination)
	cancel()
	if err != nil {
		f.log.Warn("KMS forwarder: cannot reach the KMS endpoint", zap.String("endpoint", f.cfg.Destination), zap.Error(err))
		return
	}
	defer up.Close()
	// Close must end the relay: it closes up too.
	if !f.conns.Track(up) {
		return
	}
	defer f.conns.Untrack(up)
	var last atomicTime
	last.touch()
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				last.touch()
				if _, werr := dst.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		// Half-close: the other direction may still carry the answer.
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		} else {
			_ = dst.Close()
		}
		done <- struct{}{}
	}
	go pipe(up, c)
	go pipe(c, up)
	t := time.NewTicker(max(min(f.cfg.IdleTimeout/4, time.Second), time.Millisecond))
	defer t.Stop()
	for ended := 0; ended < 2; {
		select {
		case <-done:
			ended++
		case <-t.C:
			if last.since() >= f.cfg.IdleTimeout {
				_ = c.Close()
				_ = up.Close()
				for ; ended < 2; ended++ {
					<-done
				}
				return
			}
		}
	}
}

// atomicTime is the time of the last byte relayed.
type atomicTime struct{ ns atomic.Int64 }

func (a *atomicTime) touch()               { a.ns.Store(time.Now().UnixNano()) }
func (a *atomicTime) since() time.Duration { return time.Since(time.Unix(0, a.ns.Load())) }
