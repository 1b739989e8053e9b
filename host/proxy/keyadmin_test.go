package proxy_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/host/proxy"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Key administration is refused by the proxy unless --allow-key-admin:
// a client that may sign through it cannot rotate or disable keys; the
// connection stays usable. With the flag, the call reaches the enclave.
func TestKeyAdminRefusedByDefault(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := pb.NewKeyAdminServiceClient(h.cc).CreateKey(ctx, &pb.CreateKeyRequest{KeyType: pb.KeyType_KEY_TYPE_RSA})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "--allow-key-admin") {
		t.Fatalf("CreateKey through the proxy: %v, want PermissionDenied naming --allow-key-admin", err)
	}
	if _, err := pb.NewEchoServiceClient(h.cc).Echo(ctx, &pb.EchoRequest{Payload: []byte("x")}); err != nil {
		t.Fatalf("Echo on the same connection after the refusal: %v", err)
	}

	allowed := newHarness(t, harnessOpts{mutate: func(c *proxy.Config) { c.AllowKeyAdmin = true }})
	_, err = pb.NewKeyAdminServiceClient(allowed.cc).DisableKey(ctx, &pb.DisableKeyRequest{KeyId: "x"})
	if code := status.Code(err); code == codes.PermissionDenied || code == codes.OK {
		t.Fatalf("DisableKey with --allow-key-admin: %v, want the upstream's answer", err)
	}
}
