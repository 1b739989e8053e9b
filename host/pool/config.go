package pool

import (
	"errors"
	"fmt"
	"time"
)

// Config tunes a Pool. Start from DefaultConfig and change what you need:
// Validate is strict, so a zero Config is invalid (Size 0 is a mistake, not
// "use the default").
type Config struct {
	// Size is the number of long-lived HTTP/2 connections to the upstream.
	// Each connection multiplexes many concurrent calls; several of them
	// spread the per-connection work (one reader/writer goroutine pair and
	// one flow-control window each) over cores. Default 4, at least 1.
	Size int

	// HealthCheck enables gRPC client-side health checking
	// (grpc.health.v1.Health/Watch on service ""): a connection counts as
	// READY only while the upstream says SERVING, so an enclave that is still
	// generating keys, or draining, gets no calls. An upstream without the
	// health service is treated as serving (grpc-go's documented behaviour).
	// Default true.
	HealthCheck bool

	// BackoffBase is the delay before the first reconnect attempt after a
	// connection fails. Default 50ms.
	BackoffBase time.Duration
	// BackoffMax caps the reconnect delay. It bounds how long an enclave
	// restart goes unnoticed: with the defaults a restarted enclave is used
	// again within about a second of it serving. Default 1s.
	BackoffMax time.Duration
	// BackoffMultiplier grows the delay after each failed attempt.
	// Default 1.6 (gRPC's connection-backoff spec value); at least 1.
	BackoffMultiplier float64
	// BackoffJitter randomises each delay by ±this fraction so N connections
	// do not reconnect in lock-step. Default 0.2; between 0 and 1.
	BackoffJitter float64
	// ConnectTimeout bounds one connection attempt (dial plus HTTP/2
	// handshake). The kernel's own vsock connect timeout is 2s; a local hop
	// that takes longer is broken. Default 2s.
	ConnectTimeout time.Duration

	// KeepaliveTime is how long a connection may be silent before the client
	// pings the upstream; 0 disables client keepalive pings. Default 5m:
	// grpc-go servers, unless configured otherwise, treat pings more
	// frequent than every 5 minutes as abuse and close the connection
	// (GOAWAY too_many_pings), and an enclave that dies resets its vsock
	// connections anyway, so pings are only a backstop. Values below 10s are
	// raised to 10s by grpc-go.
	KeepaliveTime time.Duration
	// KeepaliveTimeout is how long to wait for a ping's answer before the
	// connection is considered dead. Default 20s.
	KeepaliveTimeout time.Duration
}

// DefaultConfig returns the documented defaults.
func DefaultConfig() Config {
	return Config{
		Size:              4,
		HealthCheck:       true,
		BackoffBase:       50 * time.Millisecond,
		BackoffMax:        time.Second,
		BackoffMultiplier: 1.6,
		BackoffJitter:     0.2,
		ConnectTimeout:    2 * time.Second,
		KeepaliveTime:     5 * time.Minute,
		KeepaliveTimeout:  20 * time.Second,
	}
}

// maxSize guards against a typo such as --pool-size 4000: every connection
// holds buffers and goroutines on both ends.
const maxSize = 256

// Validate reports every invalid field, each with a precise message.
func (c Config) Validate() error {
	var errs []error
	if c.Size < 1 || c.Size > maxSize {
		errs = append(errs, fmt.Errorf("pool size %d: must be between 1 and %d", c.Size, maxSize))
	}
	if c.BackoffBase <= 0 {
		errs = append(errs, fmt.Errorf("pool backoff base %v: must be > 0", c.BackoffBase))
	}
	if c.BackoffMax < c.BackoffBase {
		errs = append(errs, fmt.Errorf("pool backoff max %v: must be >= backoff base %v", c.BackoffMax, c.BackoffBase))
	}
	if c.BackoffMultiplier < 1 {
		errs = append(errs, fmt.Errorf("pool backoff multiplier %v: must be >= 1", c.BackoffMultiplier))
	}
	if c.BackoffJitter < 0 || c.BackoffJitter > 1 {
		errs = append(errs, fmt.Errorf("pool backoff jitter %v: must be between 0 and 1", c.BackoffJitter))
	}
	if c.ConnectTimeout <= 0 {
		errs = append(errs, fmt.Errorf("pool connect timeout %v: must be > 0", c.ConnectTimeout))
	}
	if c.KeepaliveTime < 0 {
		errs = append(errs, fmt.Errorf("pool keepalive time %v: must be >= 0 (0 disables)", c.KeepaliveTime))
	}
	if c.KeepaliveTime > 0 && c.KeepaliveTimeout <= 0 {
		errs = append(errs, fmt.Errorf("pool keepalive timeout %v: must be > 0 when keepalive is on", c.KeepaliveTimeout))
	}
	return errors.Join(errs...)
}
