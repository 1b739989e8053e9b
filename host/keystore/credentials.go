package keystore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
	"github.com/aws/smithy-go/logging"
	"go.uber.org/zap"
)

// ErrNoCredentials wraps every failure to get AWS credentials for the
// enclave (Unavailable). Its message says where the host looked; the
// cause is in the host's log.
var ErrNoCredentials = errors.New("no AWS credentials for the enclave's KMS calls")

// Credential timing.
const (
	// DefaultCredentialsTimeout bounds one retrieval (IMDS answers in
	// milliseconds; its client retries a few times within this).
	DefaultCredentialsTimeout = 8 * time.Second
	// minValidity: credentials that expire sooner are refreshed before
	// they are handed out. The enclave asks again five minutes before the
	// expiration it is given (enclave/keyset), so it must get more.
	minValidity = 10 * time.Minute
	// forceEvery bounds those refreshes, should the source keep handing
	// out credentials that expire soon.
	forceEvery = 30 * time.Second
)

// Credentials hands out the host's AWS credentials (the instance role's,
// on EC2) for the enclave's KMS calls. Their values are never logged, nor
// put in an error.
type Credentials struct {
	provider aws.CredentialsProvider
	where    string
	timeout  time.Duration

	mu         sync.Mutex
	lastForced time.Time
}

// NewCredentials hands out p's credentials; where says, for messages,
// where p looks for them.
func NewCredentials(p aws.CredentialsProvider, where string) *Credentials {
	return &Credentials{provider: p, where: where, timeout: DefaultCredentialsTimeout}
}

// LoadCredentials returns the official SDK's default credentials chain,
// config.LoadDefaultConfig: the environment (AWS_ACCESS_KEY_ID, ...), the
// shared config and credentials files, and on EC2 the instance role
// through IMDSv2 (ec2rolecreds). IMDS is used with a session token only:
// the host never falls back to IMDSv1. optFns are LoadDefaultConfig's
// options (tests: config.WithEC2IMDSEndpoint). Nothing is fetched here.
func LoadCredentials(ctx context.Context, log *zap.Logger, optFns ...func(*config.LoadOptions) error) (*Credentials, error) {
	sdkLog := logging.LoggerFunc(func(c logging.Classification, format string, v ...any) {
		// Request and response logging is off (ClientLogMode 0): what is
		// left are the SDK's warnings, which carry no credential.
		log.Named("aws").Warn(fmt.Sprintf(format, v...), zap.String("classification", string(c)))
	})
	opts := append([]func(*config.LoadOptions) error{config.WithLogger(sdkLog), config.WithClientLogMode(0)}, optFns...)
	base, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("AWS credentials for the enclave: loading the AWS configuration: %w", err)
	}
	client := imds.NewFromConfig(base, func(o *imds.Options) { o.EnableFallback = aws.FalseTernary })
	cfg, err := config.LoadDefaultConfig(ctx, append(opts, config.WithEC2RoleCredentialOptions(func(o *ec2rolecreds.Options) {
		o.Client = client
	}))...)
	if err != nil {
		return nil, fmt.Errorf("AWS credentials for the enclave: loading the AWS configuration: %w", err)
	}
	if cfg.Credentials == nil {
		return nil, errors.New("AWS credentials for the enclave: the SDK configured no credentials provider")
	}
	var lo config.LoadOptions
	for _, fn := range optFns {
		_ = fn(&lo)
	}
	return NewCredentials(cfg.Credentials, lookedIn(lo.EC2IMDSEndpoint)), nil
}

// lookedIn says where the default chain looks, for messages.
func lookedIn(imdsEndpoint string) string {
	file := func(env, def string) string {
		if v := os.Getenv(env); v != "" {
			return v + " (" + env + ")"
		}
		return def
	}
	if imdsEndpoint == "" {
		imdsEndpoint = os.Getenv("AWS_EC2_METADATA_SERVICE_ENDPOINT")
	}
	if imdsEndpoint == "" {
		imdsEndpoint = "http://169.254.169.254"
	}
	imdsPart := "the EC2 instance role through IMDSv2 at " + imdsEndpoint
	if strings.EqualFold(os.Getenv("AWS_EC2_METADATA_DISABLED"), "true") {
		imdsPart = "not the EC2 instance role (AWS_EC2_METADATA_DISABLED=true)"
	}
	return fmt.Sprintf("the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE), "+
		"the shared files %s and %s, and %s",
		file("AWS_CONFIG_FILE", config.DefaultSharedConfigFilename()),
		file("AWS_SHARED_CREDENTIALS_FILE", config.DefaultSharedCredentialsFilename()), imdsPart)
}

// Where says where the credentials are looked for.
func (c *Credentials) Where() string { return c.where }

// Retrieve returns credentials valid for at least ten minutes when the
// source has such (else the freshest it has), within the timeout. Its
// errors are *CredentialsError: the message says where the host looked,
// the cause (the SDK's error) is for the host's log only.
func (c *Credentials) Retrieve(ctx context.Context) (aws.Credentials, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	creds, err := c.provider.Retrieve(ctx)
	if err == nil && creds.CanExpire && time.Until(creds.Expires) < minValidity {
		if cache, ok := c.provider.(*aws.CredentialsCache); ok && c.mayForce() {
			cache.Invalidate()
			// On failure the ones in hand are still valid: hand them out.
			if fresh, ferr := cache.Retrieve(ctx); ferr == nil {
				creds = fresh
			}
		}
	}
	if err == nil && !creds.HasKeys() {
		err = errors.New("the credentials source returned empty credentials")
	}
	if err == nil && creds.CanExpire && !creds.Expires.After(time.Now()) {
		err = fmt.Errorf("the freshest credentials expired at %s", creds.Expires.UTC().Format(time.RFC3339))
	}
	if err != nil {
		return aws.Credentials{}, &CredentialsError{where: c.where, cause: err}
	}
	return creds, nil
}

// CredentialsError is a failure to get credentials. Error says where the
// host looked, never a credential; Cause is the SDK's error, for the
// host's log.
type CredentialsError struct {
	where string
	cause error
}

func (e *CredentialsError) Error() string {
	return fmt.Sprintf("%v: the host looked in %s; the cause is in nitrosign-proxy's log (on EC2: attach an instance role allowed kms:Decrypt and kms:GenerateDataKey)",
		ErrNoCredentials, e.where)
}

// Unwrap is ErrNoCredentials.
func (e *CredentialsError) Unwrap() error { return ErrNoCredentials }

// Cause is why the SDK had none.
func (e *CredentialsError) Cause() error { return e.cause }

// mayForce reports whether a refresh may be forced now (at most one per
// forceEvery).
func (c *Credentials) mayForce() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Since(c.lastForced) < forceEvery {
		return false
	}
	c.lastForced = time.Now()
	return true
}
