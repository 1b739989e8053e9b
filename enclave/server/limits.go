package server

import (
	"fmt"
	"net"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/nitrosign/nitrosign/internal/limits"
)

// validateLimits checks the limit fields; zero means the default.
func (c Config) validateLimits() error {
	switch {
	case c.MaxInFlight < 0 || c.MaxInFlight > 1<<20:
		return fmt.Errorf("max in-flight calls %d: want 0 (default %d) to %d", c.MaxInFlight, DefaultMaxInFlight, 1<<20)
	case c.DefaultCallTimeout < 0:
		return fmt.Errorf("default call timeout %s is negative", c.DefaultCallTimeout)
	case c.MaxConnections < 0 || c.MaxConnections > 1<<16:
		return fmt.Errorf("max connections %d: want 0 (default %d) to %d", c.MaxConnections, DefaultMaxConnections, 1<<16)
	case c.MaxMetadataSize < 0:
		return fmt.Errorf("max metadata size %d is negative", c.MaxMetadataSize)
	case c.KeepaliveMinTime < 0, c.KeepaliveTime < 0, c.KeepaliveTimeout < 0:
		return fmt.Errorf("keepalive durations must not be negative (min time %s, time %s, timeout %s)",
			c.KeepaliveMinTime, c.KeepaliveTime, c.KeepaliveTimeout)
	case c.MaxConnectionIdle < 0, c.MaxConnectionAge < 0, c.MaxConnectionAgeGrace < 0:
		return fmt.Errorf("connection idle/age durations must not be negative (idle %s, age %s, grace %s)",
			c.MaxConnectionIdle, c.MaxConnectionAge, c.MaxConnectionAgeGrace)
	}
	d := c.limitsWithDefaults()
	if uint64(d.MaxMetadataSize) > uint64(d.MaxHeaderListSize) {
		return fmt.Errorf("max metadata size %d exceeds the max header list size %d: the transport would refuse such calls first",
			d.MaxMetadataSize, d.MaxHeaderListSize)
	}
	return nil
}

func (c Config) limitsWithDefaults() Config {
	if c.MaxInFlight == 0 {
		c.MaxInFlight = DefaultMaxInFlight
	}
	if c.DefaultCallTimeout == 0 {
		c.DefaultCallTimeout = DefaultCallTimeout
	}
	if c.MaxConnections == 0 {
		c.MaxConnections = DefaultMaxConnections
	}
	if c.MaxConcurrentStreams == 0 {
		c.MaxConcurrentStreams = DefaultMaxConcurrentStreams
	}
	if c.MaxHeaderListSize == 0 {
		c.MaxHeaderListSize = DefaultMaxHeaderListSize
	}
	if c.MaxMetadataSize == 0 {
		c.MaxMetadataSize = DefaultMaxMetadataSize
	}
	if c.KeepaliveMinTime == 0 {
		c.KeepaliveMinTime = DefaultKeepaliveMinTime
	}
	if c.KeepaliveTime == 0 {
		c.KeepaliveTime = DefaultKeepaliveTime
	}
	if c.KeepaliveTimeout == 0 {
		c.KeepaliveTimeout = DefaultKeepaliveTimeout
	}
	return c
}

// limitOptions are the transport limits of the server (defaults applied).
func limitOptions(cfg Config) []grpc.ServerOption {
	return limits.Transport{
		HandshakeTimeout:      cfg.HandshakeTimeout,
		MaxConcurrentStreams:  cfg.MaxConcurrentStreams,
		MaxHeaderListSize:     cfg.MaxHeaderListSize,
		KeepaliveMinTime:      cfg.KeepaliveMinTime,
		KeepaliveTime:         cfg.KeepaliveTime,
		KeepaliveTimeout:      cfg.KeepaliveTimeout,
		MaxConnectionIdle:     cfg.MaxConnectionIdle,
		MaxConnectionAge:      cfg.MaxConnectionAge,
		MaxConnectionAgeGrace: cfg.MaxConnectionAgeGrace,
	}.ServerOptions()
}

// limitInterceptors bound calls in flight, request metadata, and give
// unary calls without a deadline the default one.
func limitInterceptors(cfg Config, log *zap.Logger) ([]grpc.UnaryServerInterceptor, []grpc.StreamServerInterceptor) {
	th := limits.NewThrottle(time.Second)
	var inflight *limits.InFlight
	inflight = limits.NewInFlight("enclave", cfg.MaxInFlight, func() {
		if ok, more := th.Allow(); ok {
			log.Warn("shedding load: calls refused with ResourceExhausted",
				zap.Int64("limit", inflight.Limit()), zap.Uint64("refused_since_last_line", more+1),
				zap.Uint64("refused_total", inflight.Shed()))
		}
	})
	return []grpc.UnaryServerInterceptor{
			inflight.UnaryInterceptor(),
			limits.MetadataUnary(cfg.MaxMetadataSize),
			limits.DefaultDeadline(cfg.DefaultCallTimeout),
		}, []grpc.StreamServerInterceptor{
			inflight.StreamInterceptor(),
			limits.MetadataStream(cfg.MaxMetadataSize),
		}
}

// limitListener bounds the connections open at once on l.
func limitListener(l net.Listener, cfg Config, log *zap.Logger) net.Listener {
	if l == nil {
		return nil
	}
	th := limits.NewThrottle(time.Second)
	return limits.NewListener(l, cfg.MaxConnections, func(open int64) {
		if ok, more := th.Allow(); ok {
			log.Warn("connection refused: too many open connections",
				zap.Int64("open", open), zap.Int("limit", cfg.MaxConnections),
				zap.Uint64("refused_since_last_line", more+1))
		}
	})
}
