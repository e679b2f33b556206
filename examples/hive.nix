# An example hive in Colmena's format. It uses Waggle's nixpkgs stand-in
# (tests/fixtures/nixpkgs) so it evaluates and builds offline; with real
# nixpkgs you would write `meta.nixpkgs = import <nixpkgs> { };` instead.
{
  meta = {
    name = "example-fleet";
    description = "Three web servers, two databases, a cache, a monitor and a bastion";
    nixpkgs = import ../tests/fixtures/nixpkgs { system = builtins.currentSystem; };
  };

  defaults = { name, pkgs, ... }: {
    networking.hostName = name;
    boot.isContainer = true;
    system.stateVersion = "24.05";
    environment.systemPackages = [ pkgs.hello pkgs.htop ];
    environment.etc."motd".text = "Welcome to ${name}, deployed by Waggle.\n";
    deployment.tags = [ "example" ];
  };

  web-1 = { pkgs, ... }: {
    deployment.tags = [ "web" ];
    environment.systemPackages = [ pkgs.nginx ];
    services.nginx.enable = true;
    deployment.keys."tls.key" = {
      text = "not-a-real-secret";
      user = "nginx";
      group = "nginx";
      permissions = "0640";
    };
    users.users.nginx = { isSystemUser = true; group = "nginx"; };
    users.groups.nginx = { };
  };

  web-2 = { nodes, pkgs, ... }: {
    deployment.tags = [ "web" ];
    # Reads another node's configuration: same packages as web-1.
    environment.systemPackages = nodes.web-1.config.environment.systemPackages;
    services.nginx.enable = nodes.web-1.config.services.nginx.enable;
  };

  web-3 = { pkgs, ... }: {
    deployment.tags = [ "web" ];
    environment.systemPackages = [ pkgs.nginx ];
  };

  db-1 = { pkgs, ... }: {
    deployment.tags = [ "db" ];
    environment.systemPackages = [ pkgs.curl pkgs.jq ];
    systemd.services.backup = {
      description = "Nightly backup";
      after = [ "network.target" ];
      serviceConfig.ExecStart = "${pkgs.curl}/bin/curl --version";
    };
  };

  db-2 = { pkgs, ... }: {
    deployment.tags = [ "db" ];
    environment.systemPackages = [ pkgs.curl ];
  };

  cache-1 = { pkgs, ... }: {
    deployment.tags = [ "cache" ];
    services.redis.servers.main.port = 6379;
  };

  bastion = { pkgs, ... }: {
    deployment.tags = [ "ops" ];
    environment.systemPackages = [ pkgs.git ];
  };

  monitor = [
    # A node may be a list of modules.
    { deployment.tags = [ "ops" ]; }
    ({ pkgs, ... }: { environment.systemPackages = [ pkgs.cowsay ]; })
  ];
}
