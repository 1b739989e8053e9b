package server

import (
	"net"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/nitrosign/nitrosign/internal/limits"
)

// limitInterceptors bound calls in flight, request metadata, and give
// unary calls without a deadline the default one.
func limitInterceptors(cfg Config, log *zap.Logger) ([]grpc.UnaryServerInterceptor, []grpc.StreamServerInterceptor) {
	th := limits.NewThrottle(time.Second)
	var inflight *limits.InFlight
	inflight = limits.NewInFlight("enclave", cfg.Limits.MaxInFlight, func() {
		if ok, more := th.Allow(); ok {
			log.Warn("shedding load: calls refused with ResourceExhausted",
				zap.Int64("limit", inflight.Limit()), zap.Uint64("refused_since_last_line", more+1),
				zap.Uint64("refused_total", inflight.Shed()))
		}
	})
	return []grpc.UnaryServerInterceptor{
			inflight.UnaryInterceptor(),
			limits.MetadataUnary(cfg.Limits.MaxMetadataSize),
			limits.DefaultDeadline(cfg.Limits.DefaultCallTimeout),
		}, []grpc.StreamServerInterceptor{
			inflight.StreamInterceptor(),
			limits.MetadataStream(cfg.Limits.MaxMetadataSize),
		}
}

// limitListener bounds the connections open at once on l.
func limitListener(l net.Listener, cfg Config, log *zap.Logger) net.Listener {
	if l == nil {
		return nil
	}
	th := limits.NewThrottle(time.Second)
	return limits.NewListener(l, cfg.Limits.MaxConnections, func(open int64) {
		if ok, more := th.Allow(); ok {
			log.Warn("connection refused: too many open connections",
				zap.Int64("open", open), zap.Int("limit", cfg.Limits.MaxConnections),
				zap.Uint64("refused_since_last_line", more+1))
		}
	})
}
