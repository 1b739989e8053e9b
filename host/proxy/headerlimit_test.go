package proxy_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	nitrosignv1 "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// A request whose headers fit the proxy's limit but not the enclave's
// SETTINGS_MAX_HEADER_LIST_SIZE, once the proxy's own fields are added,
// gets RESOURCE_EXHAUSTED from the proxy; the shared upstream connection
// is not closed for it, and other calls on it go on.
func TestHeadersOverTheEnclavesLimit(t *testing.T) {
	h := newHarness(t, harnessOpts{poolSize: 1, upOpts: []grpc.ServerOption{grpc.MaxHeaderListSize(2048)}})
	h.waitAllReady(t)
	connects := h.proxy.UpstreamConnects()
	echo := nitrosignv1.NewEchoServiceClient(h.cc)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// 3 KB of metadata: under the proxy's 16 KiB, over the enclave's 2 KiB.
	big := metadata.AppendToOutgoingContext(ctx, "x-big", strings.Repeat("a", 3000))
	_, err := echo.Echo(big, &nitrosignv1.EchoRequest{Payload: []byte("x")})
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "SETTINGS_MAX_HEADER_LIST_SIZE") {
		t.Fatalf("Echo with headers over the enclave's limit = %v, want RESOURCE_EXHAUSTED naming the enclave's limit", err)
	}
	for i := range 20 {
		if _, err := echo.Echo(ctx, &nitrosignv1.EchoRequest{Payload: []byte("x")}); err != nil {
			t.Fatalf("Echo %d after the refused one: %v", i, err)
		}
	}
	if got := h.proxy.UpstreamConnects(); got != connects {
		t.Fatalf("upstream connections established %d, then %d: the shared connection was replaced", connects, got)
	}
}
