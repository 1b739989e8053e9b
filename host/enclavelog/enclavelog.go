// Package enclavelog receives the log lines enclaves ship to the parent
// instance (enclave/logship) and writes them to the host's own log, so
// that they land in journald beside the proxy's, with the enclave's fields
// intact: its level, message, logger name, time and every field it logged,
// plus the CID of the enclave that sent them.
//
// Anything on the parent can connect to the port, so input is bounded and
// checked like any other: a few connections at once, lines of at most
// MaxLine bytes, a rate of lines per connection; a line that is not a JSON
// object is logged as text, truncated, and marked as such.
package enclavelog

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/mdlayher/vsock"
	"go.uber.org/fx"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/nitrosign/nitrosign/internal/limits"
)

// Defaults of Config.
const (
	DefaultMaxConns     = 16
	DefaultMaxLine      = 64 << 10
	DefaultLinesPerSec  = 1000
	DefaultLinesBurst   = 5000
	DefaultIdleTimeout  = 10 * time.Minute
	maxTextLine         = 512 // bytes of a non-JSON line kept in the host's log
	reportEvery         = time.Second
	enclaveLoggerPrefix = "enclave"
)

// Config tunes a Receiver.
type Config struct {
	// Port is the vsock port (any CID) Module listens on: where enclaves
	// ship to (target.LogPort, 5050, by default on their side). 0: Module
	// does nothing.
	Port uint32
	// MaxConns bounds the connections served at once; more are closed at
	// once. Default 16 (an enclave holds one).
	MaxConns int
	// MaxLine bounds one line, in bytes; a longer one is dropped (its
	// start is reported). Default 64 KiB.
	MaxLine int
	// LinesPerSec and LinesBurst bound the lines a connection may log:
	// beyond, lines are dropped and their count reported once a second.
	// Defaults 1000 and 5000.
	LinesPerSec float64
	LinesBurst  int
	// IdleTimeout closes a connection that sends nothing for this long, so
	// silent connections cannot hold the slots (the enclave redials when it
	// next logs). Default 10m.
	IdleTimeout time.Duration
}

// Receiver writes what enclaves ship to its logger.
type Receiver struct {
	cfg   Config
	log   *zap.Logger
	conns limits.Conns
}

// New returns a Receiver that logs through log (named "enclave" and then
// by each line's own logger name).
func New(cfg Config, log *zap.Logger) *Receiver {
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.MaxLine <= 0 {
		cfg.MaxLine = DefaultMaxLine
	}
	if cfg.LinesPerSec <= 0 {
		cfg.LinesPerSec = DefaultLinesPerSec
	}
	if cfg.LinesBurst <= 0 {
		cfg.LinesBurst = DefaultLinesBurst
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	return &Receiver{cfg: cfg, log: log.Named(enclaveLoggerPrefix)}
}

// Serve accepts connections on l until l is closed (then nil) or Close.
func (r *Receiver) Serve(l net.Listener) error {
	return r.conns.Serve(l, r.cfg.MaxConns, func(err error, open int64, refused uint64) {
		if err != nil {
			r.log.Warn("enclave log receiver: accept failed", zap.Error(err))
			return
		}
		r.log.Warn("enclave log connection refused: too many open", zap.Int64("open", open),
			zap.Int("limit", r.cfg.MaxConns), zap.Uint64("refused_since_last_line", refused))
	}, r.serveConn)
}

// Close ends every connection and waits for their last lines to be
// logged. The listener is the caller's to close.
func (r *Receiver) Close() { r.conns.Close() }

// peerFields names the sender: the enclave's CID on vsock, the address
// otherwise.
func peerFields(c net.Conn) []zap.Field {
	if a, ok := c.RemoteAddr().(*vsock.Addr); ok {
		return []zap.Field{zap.Uint32("enclave_cid", a.ContextID)}
	}
	return []zap.Field{zap.String("enclave_peer", c.RemoteAddr().String())}
}

// serveConn logs each line c sends until it ends.
func (r *Receiver) serveConn(c net.Conn) {
	peer := peerFields(c)
	log := r.log.With(peer...)
	br := bufio.NewReaderSize(c, r.cfg.MaxLine)
	tokens, last := float64(r.cfg.LinesBurst), time.Now()
	var limited, oversized uint64
	var lastReport time.Time // the first drop is reported at once
	report := func(force bool) {
		if (limited == 0 && oversized == 0) || (!force && time.Since(lastReport) < reportEvery) {
			return
		}
		log.Warn("enclave log lines dropped by the host", zap.Uint64("over_rate", limited), zap.Uint64("over_size", oversized),
			zap.Float64("lines_per_sec", r.cfg.LinesPerSec), zap.Int("max_line_bytes", r.cfg.MaxLine))
		limited, oversized, lastReport = 0, 0, time.Now()
	}
	defer report(true)
	for {
		_ = c.SetReadDeadline(time.Now().Add(r.cfg.IdleTimeout))
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			oversized++
			// Skip the rest of the line.
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = br.ReadSlice('\n')
			}
			if err != nil {
				return
			}
			report(false)
			continue
		}
		if err != nil {
			// A last line without its newline was cut short (the enclave
			// went away mid-write): not logged, as it may be any prefix.
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && len(line) > 0 {
				oversized++
			}
			return
		}
		now := time.Now()
		tokens = min(float64(r.cfg.LinesBurst), tokens+now.Sub(last).Seconds()*r.cfg.LinesPerSec)
		last = now
		if tokens < 1 {
			limited++
			report(false)
			continue
		}
		tokens--
		r.logLine(log, line[:len(line)-1])
		report(false)
	}
}

// reserved are the keys of zap's JSON encoder that become the entry's own
// level, time, logger name and message.
var reserved = []string{"level", "ts", "logger", "msg", "caller", "stacktrace"}

// logLine writes one shipped line to log.
func (r *Receiver) logLine(log *zap.Logger, line []byte) {
	if len(line) == 0 {
		return
	}
	var m map[string]any
	if err := json.Unmarshal(line, &m); err != nil {
		text := line
		if len(text) > maxTextLine {
			text = text[:maxTextLine]
		}
		log.Warn("enclave sent a log line that is not a JSON object", zap.String("line", string(text)), zap.Int("bytes", len(line)))
		return
	}
	lvl := zapcore.InfoLevel
	if s, ok := m["level"].(string); ok {
		if l, err := zapcore.ParseLevel(s); err == nil {
			lvl = l
		}
	}
	// The host never panics or exits because an enclave said so.
	lvl = min(lvl, zapcore.ErrorLevel)
	msg, _ := m["msg"].(string)
	l := log
	if name, ok := m["logger"].(string); ok && name != "" {
		l = l.Named(name)
	}
	ce := l.Check(lvl, msg)
	if ce == nil {
		return
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		if !slices.Contains(reserved, k) {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	fields := make([]zap.Field, 0, len(keys)+3)
	if ts, ok := m["ts"].(float64); ok {
		fields = append(fields, zap.Time("enclave_ts", time.Unix(0, int64(ts*1e9)).UTC()))
	}
	if caller, ok := m["caller"].(string); ok {
		fields = append(fields, zap.String("enclave_caller", caller))
	}
	if st, ok := m["stacktrace"].(string); ok {
		fields = append(fields, zap.String("enclave_stacktrace", st))
	}
	for _, k := range keys {
		name := k
		if strings.HasPrefix(k, "enclave_") {
			// The host's own fields (enclave_cid, enclave_ts, ...) say who
			// sent the line: a line cannot set them.
			name = "field_" + k
		}
		fields = append(fields, zap.Any(name, m[k]))
	}
	ce.Write(fields...)
}

// Module receives enclave logs on vsock port Config.Port with the app
// (nothing when it is 0): OnStart listens and serves, OnStop closes.
var Module = fx.Module("enclavelog", fx.Invoke(register))

// Params are Module's dependencies.
type Params struct {
	fx.In

	Config    Config
	Log       *zap.Logger
	Lifecycle fx.Lifecycle
}

func register(p Params) {
	if p.Config.Port == 0 {
		return
	}
	r := New(p.Config, p.Log)
	var l net.Listener
	served := make(chan struct{})
	p.Lifecycle.Append(fx.Hook{
		OnStart: func(context.Context) error {
			var err error
			if l, err = vsock.Listen(p.Config.Port, nil); err != nil {
				return fmt.Errorf("enclave logs: listen on vsock port %d: %w (turn it off with --enclave-log-port 0)", p.Config.Port, err)
			}
			r.log.Info("receiving enclave logs", zap.Uint32("vsock_port", p.Config.Port))
			go func() {
				defer close(served)
				if err := r.Serve(l); err != nil {
					r.log.Error("enclave log receiver stopped", zap.Error(err))
				}
			}()
			return nil
		},
		OnStop: func(context.Context) error {
			_ = l.Close()
			<-served
			r.Close()
			return nil
		},
	})
}
