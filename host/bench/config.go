// Package bench is nitrosign's load generator: it drives Echo or Sign calls
// against either end of the system (the enclave over vsock, the host proxy
// over TCP, or anything else that speaks the same gRPC API) and reports
// throughput and latency percentiles from HDR histograms.
//
// Two load shapes:
//
//   - Closed loop (Config.Rate == 0): Concurrency workers each send a call as
//     soon as their previous one returns. This measures capacity: the
//     achieved rate is the system's throughput at that concurrency.
//   - Open loop (Config.Rate > 0): calls are scheduled at a constant rate,
//     call i at start + i/Rate, whatever happened to earlier calls, and
//     Concurrency bounds how many may be in flight. Latency is measured
//     from each call's intended send time, so a stall that delays the calls
//     queued behind it is counted in their latency too (coordinated
//     omission corrected, as wrk2 does). The latency from the actual send
//     time is reported beside it.
//
// Run measures one target; Compare measures several in interleaved rounds
// so that noise on a shared machine falls on every target alike. Results
// render as text (Result.WriteText, Comparison.WriteText), JSON and an SVG
// percentile chart (WriteChart).
//
// The engine is transport-agnostic: it calls a Dialer for connections and
// Conn.Call for each call. GRPCDialer is the real one; tests and the
// in-process baseline of the benchmark harness supply their own.
package bench

import (
	"errors"
	"fmt"
	"math"
	"time"
)

// Limits that catch typos before they hurt a shared machine.
const (
	// MaxConcurrency bounds in-flight calls (and workers).
	MaxConcurrency = 10000
	// MaxConnections bounds long-lived connections per target.
	MaxConnections = 10000
	// MaxRate bounds the open-loop rate, in calls per second.
	MaxRate = 1e6
	// MaxDuration bounds one measured run (warm-up excluded).
	MaxDuration = 24 * time.Hour
)

// Config is the load shape of a run. Start from DefaultConfig; Validate is
// strict.
type Config struct {
	// Connections is the number of long-lived connections the workers share
	// (worker i uses connection i mod Connections, as ghz does). It must
	// not exceed Concurrency. Ignored when ConnectEvery is set: then each
	// worker has a connection of its own. Default 1.
	Connections int
	// Concurrency is the number of workers, which is the most calls in
	// flight at once. Default 1.
	Concurrency int
	// Duration is how long the measured part of the run lasts. Exactly one
	// of Duration and Requests is set. Default 10s.
	Duration time.Duration
	// Requests is how many calls are measured (warm-up calls excluded).
	// Exactly one of Duration and Requests is set. Default 0 (use Duration).
	Requests int64
	// Warmup is run before the measured part, with the same load, and not
	// recorded: connections are established, caches and the Go runtime of
	// every process warm up. Default 0.
	Warmup time.Duration
	// Rate, in calls per second, selects the open loop: calls are scheduled
	// at this constant rate and latency is measured from each call's
	// intended send time. 0 (the default) is the closed loop.
	Rate float64
	// ConnectEvery, when > 0, makes each worker open a fresh connection for
	// every ConnectEvery calls and close the previous one, as short-lived
	// clients do. The connection set-up (TCP or vsock connect and the
	// HTTP/2 handshake) is paid by the first call on each connection and is
	// part of its latency. Default 0 (long-lived connections).
	ConnectEvery int
	// CallTimeout is the deadline of each call. Default 10s.
	CallTimeout time.Duration
}

// DefaultConfig returns the documented defaults.
func DefaultConfig() Config {
	return Config{
		Connections: 1,
		Concurrency: 1,
		Duration:    10 * time.Second,
		CallTimeout: 10 * time.Second,
	}
}

// Validate reports every invalid field, each with a precise message.
func (c Config) Validate() error {
	var errs []error
	if c.Concurrency < 1 || c.Concurrency > MaxConcurrency {
		errs = append(errs, fmt.Errorf("concurrency %d: must be between 1 and %d", c.Concurrency, MaxConcurrency))
	}
	if c.Connections < 1 || c.Connections > MaxConnections {
		errs = append(errs, fmt.Errorf("connections %d: must be between 1 and %d", c.Connections, MaxConnections))
	} else if c.ConnectEvery == 0 && c.Concurrency >= 1 && c.Connections > c.Concurrency {
		errs = append(errs, fmt.Errorf("connections %d: more than concurrency %d would leave connections without a worker", c.Connections, c.Concurrency))
	}
	switch {
	case c.Duration < 0:
		errs = append(errs, fmt.Errorf("duration %v: must not be negative", c.Duration))
	case c.Requests < 0:
		errs = append(errs, fmt.Errorf("requests %d: must not be negative", c.Requests))
	case c.Duration == 0 && c.Requests == 0:
		errs = append(errs, errors.New("give a duration or a number of requests"))
	case c.Duration > 0 && c.Requests > 0:
		errs = append(errs, errors.New("give a duration or a number of requests, not both"))
	case c.Duration > MaxDuration:
		errs = append(errs, fmt.Errorf("duration %v: at most %v", c.Duration, MaxDuration))
	}
	if c.Warmup < 0 || c.Warmup > MaxDuration {
		errs = append(errs, fmt.Errorf("warmup %v: must be between 0 and %v", c.Warmup, MaxDuration))
	}
	if math.IsNaN(c.Rate) || c.Rate < 0 || c.Rate > MaxRate {
		errs = append(errs, fmt.Errorf("rate %v: must be between 0 (closed loop) and %g calls per second", c.Rate, float64(MaxRate)))
	}
	if c.ConnectEvery < 0 {
		errs = append(errs, fmt.Errorf("connect-every %d: must not be negative (0 keeps connections open)", c.ConnectEvery))
	}
	if c.CallTimeout <= 0 {
		errs = append(errs, fmt.Errorf("call timeout %v: must be positive", c.CallTimeout))
	}
	return errors.Join(errs...)
}

// OpenLoop reports whether calls are paced at Rate.
func (c Config) OpenLoop() bool { return c.Rate > 0 }

// Shape describes the load in words, for reports.
func (c Config) Shape() string {
	var s string
	if c.OpenLoop() {
		s = fmt.Sprintf("open loop at %s calls/s (at most %d in flight)", formatCount(c.Rate), c.Concurrency)
	} else {
		s = fmt.Sprintf("closed loop, %d in flight", c.Concurrency)
	}
	if c.ConnectEvery > 0 {
		s += fmt.Sprintf(", a fresh connection every %d calls per worker", c.ConnectEvery)
	} else {
		s += fmt.Sprintf(" over %d connection%s", c.Connections, plural(c.Connections))
	}
	if c.Requests > 0 {
		s += fmt.Sprintf(", %d calls", c.Requests)
	} else {
		s += fmt.Sprintf(", %v", c.Duration)
	}
	if c.Warmup > 0 {
		s += fmt.Sprintf(" after %v warm-up", c.Warmup)
	}
	return s
}

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}
