# amqp_rs: `make` builds the extension, `make test` runs every suite, `make demo` shows it work.
export PATH := $(HOME)/.cargo/bin:$(PATH)

SO        := target/release/libamqp_rs.so
PHP       ?= php
PHP_EXT   := $(PHP) -d extension=$(CURDIR)/$(SO)
# The release .so names the commit it was built from (build.rs, php --ri amqp_rs): a commit
# that moves HEAD makes it stale too. Nothing is added outside a git checkout (a tarball).
GIT_REFS  := $(wildcard $(shell git rev-parse -q --git-path HEAD 2>/dev/null) \
               $(shell git rev-parse -q --git-path "$$(git symbolic-ref -q HEAD)" 2>/dev/null))
SOURCES   := Cargo.toml Cargo.lock build.rs $(shell find src -name '*.rs') $(GIT_REFS)
# Where `make install` puts the .so and its ini file (override both to install elsewhere).
EXTENSION_DIR ?= $(shell php-config --extension-dir 2>/dev/null)
CONF_DIRS     ?= $(wildcard /etc/php/*/cli/conf.d /etc/php/*/fpm/conf.d)
# The PHP `make deb` packages for. A build made elsewhere (e.g. in a PHP 8.4 root) is packaged
# with scripts/deb.sh --php-config ROOT/usr/bin/php-config8.4 --so THAT_BUILD.so --out DIR.
DEB_PHP_CONFIG ?= php-config

.PHONY: all build deps broker install deb test test-rust test-php test-deb matrix lint demo bench soak clean

all: build

build: $(SO)

$(SO): $(SOURCES)
	cargo build --release
	@touch $@

deps:
	@scripts/setup.sh

broker:
	@scripts/broker.sh

install: $(SO)
	install -d "$(EXTENSION_DIR)"
	install -m 0644 $(SO) "$(EXTENSION_DIR)/amqp_rs.so"
	for dir in $(CONF_DIRS); do echo "extension=amqp_rs.so" > "$$dir/30-amqp_rs.ini"; done
	@echo "installed $(EXTENSION_DIR)/amqp_rs.so: check with php --ri amqp_rs"

# php<ver>-amqp-rs_<version>_<arch>.deb in target/deb, from the release build (never a second one).
deb: $(SO)
	scripts/deb.sh --php-config $(DEB_PHP_CONFIG) --so $(SO)

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

test-rust: broker
	cargo test

test-php: broker $(SO)
	$(PHP_EXT) /usr/bin/phpunit -c php-tests/phpunit.xml --do-not-cache-result

# The package installed, used and removed in a clean Debian 12 root (made once per machine).
test-deb: broker deb
	scripts/deb-test.sh

# The whole suite again on today's newest stack (Debian sid: PHP 8.4, RabbitMQ 4.3, Laravel 13,
# PHPUnit 13) in a root kept at /var/cache/amqp-rs/sid and reused; needs root. See scripts/matrix.sh.
matrix: deps broker
	scripts/matrix.sh

# MATRIX=0 skips the sid stack (a quicker local run); CI runs both stacks. test-deb comes after
# the matrix: it also packages and installs the matrix's PHP 8.4 build, this commit's then.
MATRIX ?= 1
test: deps broker
	$(MAKE) build
	$(MAKE) lint
	$(MAKE) test-rust
	$(MAKE) test-php
	@echo "host stack: $$(scripts/stack.sh)"
	@if [ "$(MATRIX)" != 0 ]; then $(MAKE) matrix; fi
	$(MAKE) test-deb

demo: deps broker
	$(MAKE) build
	$(PHP_EXT) examples/demo.php

clean:
	cargo clean

# Side-by-side benchmarks (not part of `make test`): amqp_rs vs php-amqp vs php-amqplib.
bench: deps broker
	$(MAKE) build
	$(PHP) benches/run.php $(BENCH_ARGS)

# Soak (not part of `make test`, several minutes): 1M messages producer → queue → worker, two
# processes, with a forced disconnect every 100k; zero loss, duplicates counted. Writes
# benches/results/soak-latest.json. E.g. make soak SOAK_ARGS='--messages=50000 --every=10000'
soak: deps broker
	$(MAKE) build
	$(PHP) benches/soak.php $(SOAK_ARGS)
