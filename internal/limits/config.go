package limits

import (
	"errors"
	"flag"
	"fmt"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
)

// Config is what both gRPC servers, the enclave signer and the host proxy,
// bound about their peers' connections and calls. Each server embeds it in
// its own configuration as the field Limits, starts from its own documented
// defaults (server.DefaultConfig, proxy.DefaultConfig), registers it with
// RegisterFlags, and checks it with Validate. The convention is the same
// everywhere: a configuration is built from its defaults, never from a zero
// value, and Validate reports every invalid field; 0 is valid only where it
// means "never" (the connection idle and age fields).
//
// docs/RELIABILITY.md lists what each limit answers a peer that crosses it.
type Config struct {
	// MaxConnections bounds the connections open at once; one beyond it
	// is accepted and closed at once (before TLS, on the proxy), logged at
	// most once a second.
	MaxConnections int
	// MaxInFlight bounds the calls served at once (health calls are
	// exempt). A call beyond it gets ResourceExhausted at once ("... busy:
	// N calls in flight, limit M; retry with backoff"); nothing queues.
	MaxInFlight int
	// DefaultCallTimeout is the deadline given to a unary call that
	// arrived without one.
	DefaultCallTimeout time.Duration
	// MaxConcurrentStreams bounds the calls open at once on one connection
	// (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS): a grpc-go client waits for
	// a free stream, a raw one gets RST_STREAM(REFUSED_STREAM).
	MaxConcurrentStreams uint32
	// MaxHeaderListSize is the largest request header block accepted
	// (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE), in bytes: beyond it the
	// stream is reset, and grpc-go clients refuse to send it.
	MaxHeaderListSize uint32
	// MaxMetadataSize is the largest request metadata a call may carry, in
	// bytes (names + values + 32 per entry, as HTTP/2 counts); beyond it
	// the call gets ResourceExhausted. At most MaxHeaderListSize.
	MaxMetadataSize int
	// MaxRecvMsgSize is the largest request message accepted, in bytes;
	// a larger one gets ResourceExhausted.
	MaxRecvMsgSize int
	// HandshakeTimeout bounds how long a new connection may take for its
	// TLS handshake (if any) and the HTTP/2 preface and settings: a peer
	// that connects and stalls (slowloris) is dropped after it.
	HandshakeTimeout time.Duration
	// KeepaliveMinTime is the shortest interval between pings tolerated; a
	// peer pinging more often is sent GOAWAY (too_many_pings). Pings are
	// allowed on a connection without calls. 0 tolerates any rate.
	KeepaliveMinTime time.Duration
	// KeepaliveTime is how long a connection may be silent before the
	// server pings it, and KeepaliveTimeout how long it then waits for the
	// answer before closing it: this reaps half-open connections whose peer
	// vanished.
	KeepaliveTime    time.Duration
	KeepaliveTimeout time.Duration
	// MaxConnectionIdle closes (GOAWAY) a connection without calls for this
	// long, MaxConnectionAge one this old (+-10% jitter), after letting its
	// calls finish for up to MaxConnectionAgeGrace. 0: never (grace: as
	// long as they take).
	MaxConnectionIdle     time.Duration
	MaxConnectionAge      time.Duration
	MaxConnectionAgeGrace time.Duration
}

// Ranges Validate accepts.
const (
	maxInFlightLimit    = 1 << 20
	maxConnectionsLimit = 1 << 16
	maxRecvMsgSizeLimit = 64 << 20
)

// RegisterFlags adds a flag for every field, with c's values as defaults.
// peer names what a connection comes from in the help texts ("client
// connection" on the proxy, "connection" on the enclave).
func (c *Config) RegisterFlags(fs *flag.FlagSet, peer string) {
	fs.IntVar(&c.MaxConnections, "max-connections", c.MaxConnections, peer+"s open at once; more are closed at once (logged)")
	fs.IntVar(&c.MaxInFlight, "max-in-flight", c.MaxInFlight, "calls served at once (health exempt); beyond it RESOURCE_EXHAUSTED at once")
	fs.DurationVar(&c.DefaultCallTimeout, "default-timeout", c.DefaultCallTimeout, "deadline given to a unary call that arrives without one")
	fs.Func("max-concurrent-streams", fmt.Sprintf("calls open at once on one %s (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS) (default %d)", peer, c.MaxConcurrentStreams), uint32Flag(&c.MaxConcurrentStreams))
	fs.Func("max-header-list-size", fmt.Sprintf("largest request header block, in `bytes` (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE) (default %d)", c.MaxHeaderListSize), uint32Flag(&c.MaxHeaderListSize))
	fs.IntVar(&c.MaxMetadataSize, "max-metadata-size", c.MaxMetadataSize, "largest request metadata, in `bytes` (names + values + 32 per entry); beyond it RESOURCE_EXHAUSTED")
	fs.IntVar(&c.MaxRecvMsgSize, "max-recv-msg-size", c.MaxRecvMsgSize, "largest request message, in `bytes`; beyond it RESOURCE_EXHAUSTED")
	fs.DurationVar(&c.HandshakeTimeout, "handshake-timeout", c.HandshakeTimeout, "how long a new "+peer+" may take for its handshake and the HTTP/2 preface")
	fs.DurationVar(&c.KeepaliveMinTime, "keepalive-min-time", c.KeepaliveMinTime, "shortest interval between pings tolerated (more often: GOAWAY too_many_pings; 0: any)")
	fs.DurationVar(&c.KeepaliveTime, "keepalive-time", c.KeepaliveTime, "ping a "+peer+" silent this long")
	fs.DurationVar(&c.KeepaliveTimeout, "keepalive-timeout", c.KeepaliveTimeout, "close a "+peer+" whose ping is unanswered this long")
	fs.DurationVar(&c.MaxConnectionIdle, "max-connection-idle", c.MaxConnectionIdle, "close a "+peer+" without calls for this long (0: never)")
	fs.DurationVar(&c.MaxConnectionAge, "max-connection-age", c.MaxConnectionAge, "close a "+peer+" this old (0: never)")
	fs.DurationVar(&c.MaxConnectionAgeGrace, "max-connection-age-grace", c.MaxConnectionAgeGrace, "let calls on an aged-out "+peer+" finish for this long (0: as long as they take)")
}

// uint32Flag parses a flag into a uint32 field.
func uint32Flag(dst *uint32) func(string) error {
	return func(s string) error {
		v, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			return errors.New("want a number 0-4294967295")
		}
		*dst = uint32(v)
		return nil
	}
}

// Validate reports every invalid field, each with a precise message, joined
// (errors.Join); nil when c is usable.
func (c Config) Validate() error {
	var errs []error
	between := func(name string, v, lo, hi int64) {
		if v < lo || v > hi {
			errs = append(errs, fmt.Errorf("%s %d: want %d to %d", name, v, lo, hi))
		}
	}
	between("max connections", int64(c.MaxConnections), 1, maxConnectionsLimit)
	between("max in-flight calls", int64(c.MaxInFlight), 1, maxInFlightLimit)
	between("max concurrent streams per connection", int64(c.MaxConcurrentStreams), 1, 1<<32-1)
	between("max header list size", int64(c.MaxHeaderListSize), 1, 1<<32-1)
	between("max metadata size", int64(c.MaxMetadataSize), 1, 1<<32-1)
	between("max receive message size", int64(c.MaxRecvMsgSize), 1, maxRecvMsgSizeLimit)
	if c.MaxMetadataSize > 0 && c.MaxHeaderListSize > 0 && uint64(c.MaxMetadataSize) > uint64(c.MaxHeaderListSize) {
		errs = append(errs, fmt.Errorf("max metadata size %d exceeds the max header list size %d: the transport would refuse such calls first",
			c.MaxMetadataSize, c.MaxHeaderListSize))
	}
	for _, d := range []struct {
		name string
		v    time.Duration
		zero bool // 0 allowed (never, or any rate)
	}{
		{"default call timeout", c.DefaultCallTimeout, false},
		{"handshake timeout", c.HandshakeTimeout, false},
		{"keepalive min time", c.KeepaliveMinTime, true},
		{"keepalive time", c.KeepaliveTime, false},
		{"keepalive timeout", c.KeepaliveTimeout, false},
		{"max connection idle", c.MaxConnectionIdle, true},
		{"max connection age", c.MaxConnectionAge, true},
		{"max connection age grace", c.MaxConnectionAgeGrace, true},
	} {
		switch {
		case d.v < 0:
			errs = append(errs, fmt.Errorf("%s %v: must not be negative", d.name, d.v))
		case d.v == 0 && !d.zero:
			errs = append(errs, fmt.Errorf("%s 0s: must be > 0", d.name))
		}
	}
	return errors.Join(errs...)
}

// ServerOptions turns the transport limits into grpc.ServerOptions (a
// server that terminates HTTP/2 with grpc-go). Pings without calls are
// permitted (the proxy's and clients' keepalive) but no more often than
// KeepaliveMinTime; faster ones end the connection with too_many_pings.
func (c Config) ServerOptions() []grpc.ServerOption {
	minTime := c.KeepaliveMinTime
	if minTime == 0 {
		// grpc-go reads 0 as its default, 5 minutes: "any rate" is the
		// shortest interval instead.
		minTime = time.Nanosecond
	}
	return []grpc.ServerOption{
		grpc.ConnectionTimeout(c.HandshakeTimeout),
		grpc.MaxConcurrentStreams(c.MaxConcurrentStreams),
		grpc.MaxHeaderListSize(c.MaxHeaderListSize),
		grpc.MaxRecvMsgSize(c.MaxRecvMsgSize),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             minTime,
			PermitWithoutStream: true,
		}),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time:                  c.KeepaliveTime,
			Timeout:               c.KeepaliveTimeout,
			MaxConnectionIdle:     c.MaxConnectionIdle,
			MaxConnectionAge:      c.MaxConnectionAge,
			MaxConnectionAgeGrace: c.MaxConnectionAgeGrace,
		}),
	}
}
