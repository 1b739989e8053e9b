package proxy

import (
	"context"
	"sync"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	healthgrpc "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// healthServer answers grpc.health.v1 for service "" (the proxy is
// SERVING iff at least one upstream slot takes calls and it is not
// draining): Watch, and List with the enclave's services merged in. The
// relay answers Check of "" itself and relays Check and Watch of every
// other service to the enclaves (routeSet), so `grpc-health-probe -service
// nitrosign.v1.SignerService` through the proxy reports the enclave's
// view; this server answers those too, should it be asked.
type healthServer struct {
	healthgrpc.UnimplementedHealthServer

	up  *Upstreams
	log *zap.Logger

	mu       sync.Mutex
	ready    bool          // at least one upstream connection READY
	draining bool          // Stop has begun
	changed  chan struct{} // closed and replaced on every change of the above

}

var _ healthgrpc.HealthServer = (*healthServer)(nil)

func newHealthServer(up *Upstreams, log *zap.Logger) *healthServer {
	return &healthServer{up: up, log: log, changed: make(chan struct{})}
}

// setReady follows the proxy's count of ready upstream slots.
func (h *healthServer) setReady(n int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ready == (n > 0) {
		return
	}
	h.ready = n > 0
	h.log.Info("proxy health", zap.Stringer("status", h.statusLocked()), zap.Int("ready_upstream_conns", n))
	close(h.changed)
	h.changed = make(chan struct{})
}

// drain makes "" NOT_SERVING for good and ends every Watch, so that a
// graceful stop is not held up by health streams that never end by
// themselves.
func (h *healthServer) drain() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.draining {
		return
	}
	h.draining = true
	close(h.changed)
	h.changed = make(chan struct{})
}

func (h *healthServer) statusLocked() healthgrpc.HealthCheckResponse_ServingStatus {
	if h.ready && !h.draining {
		return healthgrpc.HealthCheckResponse_SERVING
	}
	return healthgrpc.HealthCheckResponse_NOT_SERVING
}

// current returns the proxy's status, whether it is draining, and a channel
// closed at the next change.
func (h *healthServer) current() (healthgrpc.HealthCheckResponse_ServingStatus, bool, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.statusLocked(), h.draining, h.changed
}

var errDraining = status.Error(codes.Unavailable, "proxy is shutting down")

// Check answers "" locally and forwards any other service to the enclave.
func (h *healthServer) Check(ctx context.Context, req *healthgrpc.HealthCheckRequest) (*healthgrpc.HealthCheckResponse, error) {
	if req.GetService() == "" {
		st, _, _ := h.current()
		return &healthgrpc.HealthCheckResponse{Status: st}, nil
	}
	return healthgrpc.NewHealthClient(h.up).Check(ctx, req)
}

// List returns the enclave's list with "" replaced by the proxy's own
// status; when the enclave cannot answer, the proxy's own status alone.
func (h *healthServer) List(ctx context.Context, req *healthgrpc.HealthListRequest) (*healthgrpc.HealthListResponse, error) {
	st, _, _ := h.current()
	resp, err := healthgrpc.NewHealthClient(h.up).List(ctx, req)
	if err != nil {
		h.log.Debug("health list: enclave did not answer", zap.Error(err))
		resp = &healthgrpc.HealthListResponse{}
	}
	if resp.Statuses == nil {
		resp.Statuses = map[string]*healthgrpc.HealthCheckResponse{}
	}
	resp.Statuses[""] = &healthgrpc.HealthCheckResponse{Status: st}
	return resp, nil
}

// Watch streams "" and ends with Unavailable when the proxy starts
// draining (after sending NOT_SERVING). Other services are watched on the
// enclave: the relay sends those there.
func (h *healthServer) Watch(req *healthgrpc.HealthCheckRequest, stream healthgrpc.Health_WatchServer) error {
	if req.GetService() != "" {
		return status.Errorf(codes.Unimplemented, "proxy: health of service %q is watched on the enclave", req.GetService())
	}
	ctx := stream.Context()
	last := healthgrpc.HealthCheckResponse_ServingStatus(-1)
	for {
		st, draining, changed := h.current()
		if st != last {
			if err := stream.Send(&healthgrpc.HealthCheckResponse{Status: st}); err != nil {
				return err
			}
			last = st
		}
		if draining {
			return errDraining
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
	}
}
