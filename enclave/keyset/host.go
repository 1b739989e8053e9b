package keyset

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/nitrosign/nitrosign/internal/keysetfmt"
	"github.com/nitrosign/nitrosign/internal/target"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// hostCallTimeout bounds each call to the host.
const hostCallTimeout = 10 * time.Second

// dialHost returns a client of the host's HostService at addr. The
// connection carries only what the parent may see: sealed keysets and
// the instance role's credentials, which it has anyway.
func dialHost(addr string) (*grpc.ClientConn, error) {
	t, err := target.Parse(addr)
	if err != nil {
		return nil, fmt.Errorf("host address: %w", err)
	}
	return grpc.NewClient(t.GRPCTarget(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(t.Dialer()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(keysetfmt.MaxSize+64<<10)),
	)
}

// hostCredentials asks the host for the instance role's credentials; the
// KMS client caches them and asks again five minutes before they expire.
func hostCredentials(host pb.HostServiceClient) aws.CredentialsProvider {
	return aws.CredentialsProviderFunc(func(ctx context.Context) (aws.Credentials, error) {
		ctx, cancel := context.WithTimeout(ctx, hostCallTimeout)
		defer cancel()
		r, err := host.GetCredentials(ctx, &pb.GetCredentialsRequest{})
		if err != nil {
			return aws.Credentials{}, fmt.Errorf("credentials from the host: %w", err)
		}
		if r.GetAccessKeyId() == "" || r.GetSecretAccessKey() == "" {
			return aws.Credentials{}, errors.New("credentials from the host: empty")
		}
		c := aws.Credentials{
			AccessKeyID:     r.GetAccessKeyId(),
			SecretAccessKey: r.GetSecretAccessKey(),
			SessionToken:    r.GetSessionToken(),
			Source:          "nitrosign host (instance role)",
		}
		if r.GetExpiration() != nil {
			c.CanExpire, c.Expires = true, r.GetExpiration().AsTime()
		}
		return c, nil
	})
}
