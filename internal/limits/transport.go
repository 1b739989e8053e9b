package limits

import (
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
)

// Transport are the HTTP/2 connection limits of a gRPC server. Zero values
// mean what they mean to grpc-go (no limit, or its default); each server
// package fills in its own documented defaults first.
type Transport struct {
	HandshakeTimeout      time.Duration
	MaxConcurrentStreams  uint32
	MaxHeaderListSize     uint32
	KeepaliveMinTime      time.Duration
	KeepaliveTime         time.Duration
	KeepaliveTimeout      time.Duration
	MaxConnectionIdle     time.Duration
	MaxConnectionAge      time.Duration
	MaxConnectionAgeGrace time.Duration
}

// ServerOptions turns t into grpc.ServerOptions. Pings without calls are
// permitted (the pool's and clients' keepalive) but no more often than
// KeepaliveMinTime; faster ones end the connection with too_many_pings.
func (t Transport) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ConnectionTimeout(t.HandshakeTimeout),
		grpc.MaxConcurrentStreams(t.MaxConcurrentStreams),
		grpc.MaxHeaderListSize(t.MaxHeaderListSize),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             t.KeepaliveMinTime,
			PermitWithoutStream: true,
		}),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time:                  t.KeepaliveTime,
			Timeout:               t.KeepaliveTimeout,
			MaxConnectionIdle:     t.MaxConnectionIdle,
			MaxConnectionAge:      t.MaxConnectionAge,
			MaxConnectionAgeGrace: t.MaxConnectionAgeGrace,
		}),
	}
}
